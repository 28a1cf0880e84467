// flowdesk support chat: clear the box after sending, keep the newest message in view,
// send with Enter (Shift+Enter for a new line). The page works without this file too.
(function () {
  "use strict";
  function bottom() {
    var log = document.getElementById("transcript");
    if (log) log.scrollTop = log.scrollHeight;
  }
  // A reply being drafted by the assistant streams in (server-sent events) until the
  // transcript, read from the durable conversation, shows the finished one.
  function draftBox() { return document.getElementById("draft"); }
  function clearDraft() {
    var box = draftBox();
    if (!box) return;
    box.hidden = true;
    box.querySelector(".msg-text").textContent = "";
  }
  function stream() {
    var box = draftBox();
    if (!box || !window.EventSource) return;
    var source = new EventSource(box.getAttribute("data-stream"));
    source.addEventListener("open", function () { document.body.setAttribute("data-stream", "open"); });
    source.addEventListener("draft", function (event) {
      var text = box.querySelector(".msg-text");
      text.textContent += JSON.parse(event.data);
      box.hidden = false;
      var seen = Number(document.body.getAttribute("data-draft-chunks") || "0") + 1;
      document.body.setAttribute("data-draft-chunks", String(seen));
      box.scrollIntoView({ block: "nearest" });
    });
    source.addEventListener("restart", function () { box.querySelector(".msg-text").textContent = ""; });
  }
  document.addEventListener("DOMContentLoaded", function () { bottom(); stream(); });
  document.addEventListener("htmx:afterSwap", function () {
    bottom();
    var log = document.getElementById("transcript");
    if (log && log.getAttribute("data-state") !== "thinking") clearDraft();
  });
  document.addEventListener("htmx:afterRequest", function (event) {
    var form = event.target;
    if (form && form.id === "chat-form" && event.detail.successful) {
      form.reset();
      form.querySelector("textarea").focus();
    }
  });
  document.addEventListener("keydown", function (event) {
    var box = event.target;
    if (box && box.id === "chat-text" && event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      if (box.value.trim()) box.form.requestSubmit();
    }
  });
})();
