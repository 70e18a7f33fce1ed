/* Draw each Plotly figure when it comes near the viewport (or all of them before printing,
   or on window.renderAllFigures()), so a long report opens at once. Specs are inline JSON
   next to their div (reports/plots.py: to_div); nothing is fetched. */
(function () {
  "use strict";
  var config = {{ plot_config }};
  function draw(div) {
    if (div.dataset.drawn) { return; }
    div.dataset.drawn = "1";
    try {
      var spec = JSON.parse(document.getElementById(div.id + "-data").textContent);
      Plotly.newPlot(div, spec.data, spec.layout, config);
    } catch (err) {
      div.dataset.drawn = "error";
      div.textContent = "figure could not be drawn: " + err;
      console.error("figure " + div.id + " could not be drawn: " + err);
    }
  }
  window.renderAllFigures = function () {
    document.querySelectorAll(".plotly-lazy").forEach(draw);
  };
  function start() {
    var divs = document.querySelectorAll(".plotly-lazy");
    if (!("IntersectionObserver" in window)) { divs.forEach(draw); return; }
    var seen = new IntersectionObserver(function (entries) {
      entries.forEach(function (e) {
        if (e.isIntersecting) { seen.unobserve(e.target); draw(e.target); }
      });
    }, {rootMargin: "600px 0px"});
    divs.forEach(function (d) { seen.observe(d); });
  }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", start); } else { start(); }
  window.addEventListener("beforeprint", window.renderAllFigures);
}());
