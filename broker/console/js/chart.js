// chart.js: per-minute rate charts drawn with the vendored uPlot library
// (index.html loads it as the global `uPlot`). One chart shows some of the
// MinuteCounts series (produced, delivered, ...) over a window of minutes.

import { h } from "./dom.js";

/** Label and colour of every MinuteCounts series. */
export const SERIES = {
  produced: { label: "produced", color: "#1f77b4" },
  delivered: { label: "delivered", color: "#2ca02c" },
  acked: { label: "acked", color: "#17becf" },
  retried: { label: "retried", color: "#ff7f0e" },
  expired: { label: "expired", color: "#9467bd" },
  dead_lettered: { label: "dead-lettered", color: "#d62728" },
};

const HEIGHT = 220;
/** Tick spacings of the count axis: whole numbers only. */
const INTEGER_STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6, 1e7, 1e8, 1e9];

function columns(minutes, keys) {
  const xs = minutes.map((minute) => minute.minute_ms / 1000);
  return [xs, ...keys.map((key) => minutes.map((minute) => Number(minute[key] ?? 0)))];
}

/**
 * Draws `keys` of `minutes` ([MinuteCounts]) into `container` (which must be
 * in the document). Returns {update(minutes), destroy()}.
 */
export function minuteChart(container, title, keys, minutes) {
  if (typeof window.uPlot !== "function") {
    container.replaceChildren(h("p", { class: "muted chart-empty", text: "The chart library did not load." }));
    return { update() {}, destroy() {} };
  }
  const width = () => Math.max(320, container.clientWidth || 640);
  const options = {
    title,
    width: width(),
    height: HEIGHT,
    // Counts are whole numbers, starting at zero.
    scales: { x: { time: true }, y: { range: (_plot, _min, max) => [0, Math.max(1, max)] } },
    series: [
      { label: "minute" },
      ...keys.map((key) => ({
        label: SERIES[key].label,
        stroke: SERIES[key].color,
        width: 2,
        points: { show: false },
      })),
    ],
    axes: [{}, { label: "per minute", size: 60, incrs: INTEGER_STEPS }],
  };
  const plot = new window.uPlot(options, columns(minutes, keys), container);
  let lastWidth = options.width;
  let frame = 0;
  const observer = new ResizeObserver(() => {
    cancelAnimationFrame(frame);
    frame = requestAnimationFrame(() => {
      const next = width();
      if (next !== lastWidth) {
        lastWidth = next;
        plot.setSize({ width: next, height: HEIGHT });
      }
    });
  });
  observer.observe(container);
  return {
    update(fresh) {
      plot.setData(columns(fresh, keys));
    },
    destroy() {
      cancelAnimationFrame(frame);
      observer.disconnect();
      plot.destroy();
    },
  };
}
