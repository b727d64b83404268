// Progressive enhancement: the pages are complete without this. With it, the
// server's change notices (Server-Sent Events on /events) make the open page fetch
// its own <main> again and swap it in, without a reload. EventSource reconnects by
// itself; the indicator in the header says whether the page is live.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var main = document.getElementById("main");
  if (!live || !main || !window.EventSource || !window.fetch) return;
  var busy = false, again = false, held = false, pressed = false;
  // Someone working on a form inside <main> must not lose it to a live update:
  // while a field or button there has focus, or the pointer is down on the page
  // (a click on "Change" moves focus off the field before it lands, and not every
  // browser focuses buttons), updates are held and come in afterwards.
  function editing() {
    if (pressed) return true;
    var a = document.activeElement;
    return a && main.contains(a) && /^(INPUT|SELECT|TEXTAREA|BUTTON)$/.test(a.tagName);
  }
  // `data-held` marks a held update, for people reading the DOM and for tests.
  function hold(on) {
    held = on;
    if (on) main.dataset.held = "1"; else delete main.dataset.held;
  }
  // Runs after the focus or pointer change has settled (and after the click it
  // ended, which may submit the form and leave the page anyway).
  function release() {
    setTimeout(function () {
      if (held && !editing()) { hold(false); refresh(); }
    }, 0);
  }
  main.addEventListener("focusout", release);
  main.addEventListener("pointerdown", function () { pressed = true; });
  document.addEventListener("pointerup", function () { pressed = false; release(); });
  document.addEventListener("pointercancel", function () { pressed = false; release(); });
  function refresh() {
    if (editing()) { hold(true); return; }
    if (busy) { again = true; return; }
    busy = true;
    fetch(location.href, { headers: { "X-Fragment": "main" }, cache: "no-store" })
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.text(); })
      .then(function (html) {
        // The person may have started on a form while this was in flight: keep
        // what they did, and fetch again once they leave the field.
        if (editing()) { hold(true); return; }
        main.innerHTML = html;
        main.dataset.updates = String(Number(main.dataset.updates || 0) + 1);
      })
      .catch(function () { live.className = "off"; live.textContent = "update failed"; })
      .then(function () { busy = false; if (again) { again = false; refresh(); } });
  }
  var source = new EventSource("/events");
  source.addEventListener("open", function () { live.className = "on"; live.textContent = "live"; });
  source.addEventListener("error", function () { live.className = "off"; live.textContent = "reconnecting"; });
  source.addEventListener("change", refresh);
})();
