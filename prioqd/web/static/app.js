// prioqd dashboard: refresh the live part of the page while it is visible, and
// nothing else. No page open, or a hidden tab: no request at all.
(function () {
  "use strict";
  const live = document.getElementById("live");
  const stamp = document.getElementById("refreshed");
  let timer = null;

  function schedule() {
    if (live && timer === null && !document.hidden) {
      timer = setTimeout(refresh, Number(live.dataset.refreshMs) || 2000);
    }
  }

  async function refresh() {
    timer = null;
    if (document.hidden) return;
    // Leave the page alone while someone is using a control inside it.
    const active = document.activeElement;
    const busy = active && active !== document.body && live.contains(active) &&
      active.matches("input, select, textarea");
    if (!busy) {
      try {
        const response = await fetch(live.dataset.src, {
          credentials: "same-origin",
          cache: "no-store",
        });
        if (response.ok) {
          // The server renders the fragment with every value escaped.
          live.innerHTML = await response.text();
          if (stamp) stamp.textContent = "updated " + new Date().toLocaleTimeString();
        } else if (stamp) {
          stamp.textContent = "refresh failed: HTTP " + response.status;
        }
      } catch (err) {
        if (stamp) stamp.textContent = "refresh failed: " + err;
      }
    }
    schedule();
  }

  document.addEventListener("visibilitychange", function () {
    if (document.hidden) {
      if (timer !== null) clearTimeout(timer);
      timer = null;
    } else if (live) {
      refresh();
    }
  });

  document.addEventListener("click", function (event) {
    const button = event.target.closest("[data-copy]");
    if (!button) return;
    const source = document.getElementById(button.dataset.copy);
    if (!source) return;
    const text = source.textContent;
    const done = function () { button.textContent = "Copied"; };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () {});
    } else {
      const range = document.createRange();
      range.selectNodeContents(source);
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      if (document.execCommand("copy")) done();
    }
  });

  schedule();
})();
