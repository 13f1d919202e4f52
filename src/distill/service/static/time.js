// Show Unix times (data-time) as local date and time.
document.querySelectorAll("[data-time]").forEach(function (cell) {
  var seconds = parseFloat(cell.dataset.time);
  if (!isNaN(seconds)) cell.textContent = new Date(seconds * 1000).toLocaleString();
});
