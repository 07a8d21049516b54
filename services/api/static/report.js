/* The report's filter form: leave empty fields out of the URL, so it stays short to share.
 * (Without this script the form still works; the URL just lists the empty fields too.) */
"use strict";

(function () {
  const form = document.querySelector("form.filters");
  if (!form) return;
  form.addEventListener("submit", () => {
    for (const field of form.querySelectorAll("input, select")) {
      if (field.name && field.value === "" && field.type !== "checkbox") field.disabled = true;
    }
    // Re-enable after the browser has read the form (for bfcache / back navigation).
    setTimeout(() => { for (const field of form.querySelectorAll(":disabled")) field.disabled = false; }, 0);
  });
})();
