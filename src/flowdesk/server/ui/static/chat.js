// flowdesk support chat: clear the box after sending, keep the newest message in view,
// send with Enter (Shift+Enter for a new line). The page works without this file too.
(function () {
  "use strict";
  function bottom() {
    var log = document.getElementById("transcript");
    if (log) log.scrollTop = log.scrollHeight;
  }
  document.addEventListener("DOMContentLoaded", bottom);
  document.addEventListener("htmx:afterSwap", bottom);
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
