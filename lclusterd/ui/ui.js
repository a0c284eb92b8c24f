// lclusterd status page: the little it needs beyond server-rendered HTML.
// Output arrives as text and is appended as a text node: never parsed as HTML.
"use strict";

function follow(pre) {
  const state = document.getElementById("output-state");
  state.textContent = "following the output…";
  const decoder = new TextDecoder();
  fetch(pre.dataset.follow, {credentials: "same-origin"}).then((answer) => {
    if (!answer.ok) {
      return answer.text().then((text) => { state.textContent = text; });
    }
    const reader = answer.body.getReader();
    function more() {
      return reader.read().then(({done, value}) => {
        if (done) {
          pre.appendChild(document.createTextNode(decoder.decode()));
          state.textContent = "the job has ended; reloading for its record…";
          setTimeout(() => location.reload(), 1000);
          return;
        }
        const atEnd = window.innerHeight + window.scrollY >= document.body.scrollHeight - 4;
        pre.appendChild(document.createTextNode(decoder.decode(value, {stream: true})));
        if (atEnd) window.scrollTo(0, document.body.scrollHeight);
        return more();
      });
    }
    return more();
  }).catch((error) => { state.textContent = "lost the output stream: " + error; });
}

function refresh(seconds) {
  // Reload list pages, unless the reader is selecting text or typing.
  setInterval(() => {
    const busy = String(window.getSelection()) !== "" ||
      (document.activeElement && ["INPUT", "SELECT"].includes(document.activeElement.tagName));
    if (!busy && !document.hidden) location.reload();
  }, seconds * 1000);
}

document.addEventListener("DOMContentLoaded", () => {
  const pre = document.getElementById("output");
  if (pre && pre.dataset.follow) follow(pre);
  if (document.body.dataset.refresh) refresh(Number(document.body.dataset.refresh));
});
