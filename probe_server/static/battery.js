// The measurement battery's beacon (probe_server/battery.py).
//
// For every probe of the ball page (the red balls, the blue balls and the
// battery's hidden images) it reports to the page's own site whether the
// image loaded, failed, or was still loading, with its timings from Resource
// Timing. The server sees which probes were fetched without this script;
// the beacon adds what the server cannot see: a fetch that failed versus a
// page closed before it finished, and how long each took.
//
// One report when every probe has settled, or after data-timeout ms with the
// rest marked "timeout"; if the page is closed before that, one report with
// the rest "pending". The page works the same without it.
(function () {
  "use strict";
  var box = document.getElementById("battery");
  if (!box || !box.getAttribute("data-beacon") || !navigator.sendBeacon) {
    return;
  }
  var RANK = { loaded: 3, failed: 2, timeout: 1, pending: 0 };
  var items = [];
  var sent = false;

  function probeOf(img) {
    var name = img.getAttribute("data-probe");
    if (name) {
      return name;
    }
    if (img.src.indexOf("/red/") >= 0) {
      return "ipv4";
    }
    return img.src.indexOf("/blue/") >= 0 ? "ipv6" : null;
  }

  function entryOf(img) {
    var url = img.currentSrc || img.src;
    var entries = performance.getEntriesByName ? performance.getEntriesByName(url) : [];
    return entries.length ? entries[0] : null;
  }

  // When the image's response ended, in ms since the page's navigation
  // began (Resource Timing), or null where the browser gives none. An image
  // that loaded before this deferred script ran would otherwise get the
  // script's start as its time.
  function responseEnd(img) {
    var entry = entryOf(img);
    return entry && entry.responseEnd > 0 ? entry.responseEnd : null;
  }

  function timing(img) {
    var entry = entryOf(img);
    if (!entry) {
      return {};
    }
    var result = { duration: entry.duration };
    // Zero without Timing-Allow-Origin or on a reused connection.
    if (entry.domainLookupEnd > 0) {
      result.dns = entry.domainLookupEnd - entry.domainLookupStart;
    }
    if (entry.connectEnd > 0) {
      result.connect = entry.connectEnd - entry.connectStart;
    }
    return result;
  }

  function round(value) {
    return Math.max(0, Math.round(value * 10) / 10);
  }

  function report(final) {
    var probes = {};
    items.forEach(function (item) {
      var best = probes[item.probe];
      if (best && RANK[best.state] >= RANK[item.state]) {
        return;
      }
      var seen = { state: item.state, at: round(item.at === null ? performance.now() : item.at) };
      if (item.state === "loaded") {
        var times = timing(item.img);
        ["duration", "dns", "connect"].forEach(function (key) {
          if (typeof times[key] === "number" && isFinite(times[key])) {
            seen[key] = round(times[key]);
          }
        });
      }
      probes[item.probe] = seen;
    });
    return { token: box.getAttribute("data-token"), final: final, probes: probes };
  }

  function send(final) {
    if (sent) {
      return;
    }
    sent = true;
    navigator.sendBeacon(box.getAttribute("data-beacon"), JSON.stringify(report(final)));
    box.setAttribute("data-sent", final ? "final" : "closed");
  }

  function settle(item, state) {
    if (item.state !== "pending" || sent) {
      return;
    }
    item.state = state;
    // Milliseconds since the page's navigation began: when the response
    // ended if the browser says, else now (an error event, an old browser).
    var ended = state === "loaded" ? responseEnd(item.img) : null;
    item.at = ended === null ? performance.now() : ended;
    if (items.every(function (other) { return other.state !== "pending"; })) {
      send(true);
    }
  }

  var images = Array.prototype.slice.call(document.querySelectorAll(".balls img"));
  images = images.concat(Array.prototype.slice.call(box.querySelectorAll("img[data-probe]")));
  images.forEach(function (img) {
    var probe = probeOf(img);
    if (probe) {
      items.push({ probe: probe, img: img, state: "pending", at: null });
    }
  });
  items.forEach(function (item) {
    if (item.img.complete) {
      settle(item, item.img.naturalWidth > 0 ? "loaded" : "failed");
      return;
    }
    item.img.addEventListener("load", function () { settle(item, "loaded"); });
    item.img.addEventListener("error", function () { settle(item, "failed"); });
  });

  var timeout = Number(box.getAttribute("data-timeout")) || 10000;
  setTimeout(function () {
    items.forEach(function (item) {
      if (item.state === "pending") {
        item.state = "timeout";
        item.at = performance.now();
      }
    });
    send(true);
  }, timeout);
  // Closed, reloaded or submitted before then: what was still loading is "pending".
  window.addEventListener("pagehide", function () { send(false); });
})();
