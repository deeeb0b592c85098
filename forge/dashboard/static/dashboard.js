// forge dashboard: live updates over server-sent events. No dependencies, no build step.
// The server renders every region (escaped, in Jinja2); this file only swaps them in, appends
// a job's new output as text, and asks before destructive actions.
(function () {
  "use strict";

  function confirmForms(root) {
    root.querySelectorAll("form[data-confirm]").forEach(function (form) {
      if (form.dataset.bound) return;
      form.dataset.bound = "1";
      form.addEventListener("submit", function (ev) {
        if (!window.confirm(form.dataset.confirm)) ev.preventDefault();
      });
    });
  }

  function nearBottom(el) {
    return el.scrollHeight - el.scrollTop - el.clientHeight < 40;
  }

  function start() {
    confirmForms(document);
    var url = document.body.dataset.live;
    if (!url || !window.EventSource) return;
    var dot = document.getElementById("live-dot");
    var problem = document.getElementById("problem");
    var log = document.getElementById("log");
    var source = new EventSource(url);
    source.onopen = function () { if (dot) dot.className = "live-dot on"; };
    source.onerror = function () { if (dot) dot.className = "live-dot off"; };
    source.addEventListener("region", function (ev) {
      var msg = JSON.parse(ev.data);
      var el = document.getElementById(msg.id);
      if (!el) return;
      el.innerHTML = msg.html; // rendered and escaped by the server's templates
      confirmForms(el);
      if (problem) problem.hidden = true;
    });
    source.addEventListener("log", function (ev) {
      var msg = JSON.parse(ev.data);
      if (!log) return;
      var follow = nearBottom(log);
      log.appendChild(document.createTextNode(msg.text));
      log.dataset.offset = msg.offset;
      if (follow) log.scrollTop = log.scrollHeight;
    });
    source.addEventListener("problem", function (ev) {
      if (!problem) return;
      problem.textContent = JSON.parse(ev.data).text;
      problem.hidden = false;
    });
    if (log) log.scrollTop = log.scrollHeight;
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
