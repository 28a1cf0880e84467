// flowdesk web UI: keyboard navigation of lists, and linking form fields to the boxes
// drawn over the source document. Everything works without this file too.
(function () {
  "use strict";

  // j / k move through the rows of a list (inbox, runs); Enter opens the focused one.
  document.addEventListener("keydown", function (event) {
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    var tag = (event.target && event.target.tagName) || "";
    if (/^(INPUT|TEXTAREA|SELECT)$/.test(tag) || (event.target && event.target.isContentEditable)) return;
    if (event.key !== "j" && event.key !== "k") return;
    var links = Array.prototype.slice.call(document.querySelectorAll("[data-row-link]"));
    if (!links.length) return;
    var at = links.indexOf(document.activeElement);
    var next = event.key === "j" ? Math.min(links.length - 1, at + 1) : Math.max(0, at - 1);
    if (at === -1) next = 0;
    links[next].focus();
    event.preventDefault();
  });

  function boxes(name) {
    return document.querySelectorAll('[data-box="' + name.replace(/"/g, "") + '"]');
  }

  function highlight(name, scroll) {
    document.querySelectorAll(".box.active").forEach(function (b) { b.classList.remove("active"); });
    var found = boxes(name);
    found.forEach(function (b) { b.classList.add("active"); });
    if (scroll && found.length) found[0].scrollIntoView({ behavior: "smooth", block: "center" });
  }

  // Focusing a field (or pressing "show on page") outlines where its value was read.
  document.addEventListener("focusin", function (event) {
    var field = event.target.closest && event.target.closest("[data-field]");
    if (field) highlight(field.getAttribute("data-field"), false);
  });
  document.addEventListener("click", function (event) {
    var button = event.target.closest && event.target.closest("[data-show-field]");
    if (button) highlight(button.getAttribute("data-show-field"), true);
  });
})();
