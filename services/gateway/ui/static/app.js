// OMA operator GUI: selection count and errors that stay until dismissed. No inline script (CSP).
(function () {
  "use strict";
  function rows() { return document.querySelectorAll("input.row-select"); }
  function updateCount() {
    var out = document.getElementById("selected-count");
    if (out) out.textContent = String(Array.prototype.filter.call(rows(), function (b) { return b.checked; }).length);
  }
  document.addEventListener("change", function (ev) {
    var t = ev.target;
    if (t.id === "select-all") rows().forEach(function (b) { b.checked = t.checked; });
    if (t.id === "select-all" || t.classList.contains("row-select")) updateCount();
  });
  document.addEventListener("DOMContentLoaded", updateCount);

  function showError(text) {
    var box = document.getElementById("errors");
    if (!box) return;
    var p = document.createElement("p");
    var button = document.createElement("button");
    p.textContent = text + " ";
    button.type = "button";
    button.textContent = "Dismiss";
    button.addEventListener("click", function () { p.remove(); });
    p.appendChild(button);
    box.appendChild(p);
  }
  document.addEventListener("htmx:responseError", function (ev) {
    var xhr = ev.detail.xhr, text = "Request failed (" + xhr.status + ")";
    try {
      var body = JSON.parse(xhr.responseText);
      text = body.error + (body.details ? ": " + body.details : "");
    } catch (e) { /* not JSON: keep the status */ }
    showError(text);
  });
  document.addEventListener("htmx:sendError", function () { showError("The appliance did not answer; check the network."); });
})();
