// Live progress of a job page: reads the job's server-sent events and updates the status, the progress bar, the
// event list and the learning curves; when the job ends the page reloads to show the report and the downloads.
(function () {
  "use strict";
  var root = document.getElementById("job");
  if (!root || root.dataset.terminal === "yes") return;
  var id = root.dataset.job;
  var el = function (name) { return document.getElementById(name); };
  var source = new EventSource("/ui/jobs/" + encodeURIComponent(id) + "/events?after=" + root.dataset.lastEvent);
  var curvesAt = 0;

  function log(kind, data, number) {
    var item = document.createElement("li");
    if (number) item.value = number;
    var bold = document.createElement("b");
    bold.textContent = kind;  // text only: nothing from the stream is parsed as HTML
    item.appendChild(bold);
    item.appendChild(document.createTextNode(" " + JSON.stringify(data)));
    var list = el("events");
    list.appendChild(item);
    while (list.children.length > 200) list.removeChild(list.firstChild);
  }

  function progress(done, total) {
    var bar = el("progress");
    bar.max = total || 1;
    bar.value = done || 0;
    el("count").textContent = total ? done + "/" + total : "";
  }

  function refreshCurves() {
    var now = Date.now();
    if (now - curvesAt < 1000) return;
    curvesAt = now;
    el("curves-section").hidden = false;
    el("curves").src = "/ui/jobs/" + encodeURIComponent(id) + "/curves.png?t=" + now;
  }

  function handle(kind) {
    source.addEventListener(kind, function (message) {
      var event = JSON.parse(message.data);
      var data = event.data || {};
      if (kind === "status") {
        el("status").textContent = data.status;
        el("status").className = "status-" + data.status;
      } else if (kind === "stage") {
        el("stage").textContent = data.name;
        progress(0, data.total);
      } else if (kind === "progress") {
        progress(data.done, data.total);
        var figures = [];
        for (var key in data) {
          if (["stage", "done", "total"].indexOf(key) < 0 && typeof data[key] === "number") {
            figures.push(key + " " + data[key].toFixed(4));
          }
        }
        el("figures").textContent = figures.length ? " · " + figures.join(", ") : "";
      } else if (kind === "stage_end") {
        progress(data.done, data.total);
      } else if (kind === "epoch") {
        refreshCurves();
      }
      log(kind, data, event.id);
    });
  }
  ["status", "stage", "progress", "stage_end", "epoch", "cancel_requested", "error", "result"].forEach(handle);
  source.onmessage = function (message) { log("message", message.data); };
  source.addEventListener("end", function (message) {
    source.close();
    var end = JSON.parse(message.data);
    el("status").textContent = end.status;
    el("status").className = "status-" + end.status;
    if (end.status === "succeeded") progress(1, 1);
    root.dataset.terminal = "yes";
    setTimeout(function () { window.location.reload(); }, 1500);
  });
})();
