// Review inbox: the only script. It waits for a decided task's outcome and then reloads
// the page; everything else works without JavaScript. No agent-produced text is ever put
// into the page from here (the server renders, escaped).
"use strict";
(function () {
  var status = document.getElementById("status");
  if (!status || !status.dataset.poll) { return; }
  var url = status.dataset.poll, tries = 0;
  function check() {
    tries += 1;
    fetch(url, { headers: { "Accept": "application/json" }, credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (body) {
        if (body && body.outcome) { window.location.reload(); }
        else if (tries < 600) { window.setTimeout(check, tries < 20 ? 250 : 2000); }
      })
      .catch(function () { window.setTimeout(check, 2000); });
  }
  window.setTimeout(check, 250);
})();
