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
  function problem(text) {
    var line = document.getElementById("chat-error");
    if (!line) return;
    line.textContent = text || "";
    line.hidden = !text;
  }
  document.addEventListener("htmx:beforeRequest", function (event) {
    var form = event.target;
    if (!form || form.id !== "chat-form") return;
    if (!form.querySelector("textarea").value.trim()) {
      event.preventDefault();
      problem("Write a message first.");
    } else {
      problem("");
    }
  });
  document.addEventListener("htmx:responseError", function (event) {
    if (event.target && event.target.id !== "chat-form") return;
    var status = event.detail.xhr.status;
    problem(status === 404
      ? "This conversation no longer exists. Reload the page to start a new one."
      : "Your message could not be sent (error " + status + "). Please try again.");
  });
  document.addEventListener("htmx:sendError", function () {
    problem("The connection was lost. Please try again.");
  });
  document.addEventListener("keydown", function (event) {
    var box = event.target;
    if (box && box.id === "chat-text" && event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      if (box.value.trim()) box.form.requestSubmit();
    }
  });
})();
