// Keyboard use of any page with cards: j and k (or the arrow keys, once a card has focus) move between
// the cards, Enter opens the focused card's "similar to this", and / goes to the search page's URL box.
(function () {
  const NEXT = ["j", "ArrowRight", "ArrowDown"];
  const PREVIOUS = ["k", "ArrowLeft", "ArrowUp"];

  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.ctrlKey || event.metaKey || event.target.closest("input, select, textarea")) return;
    if (event.key === "/") {
      const box = document.getElementById("query-box");
      if (box) {
        event.preventDefault();
        box.focus();
      }
      return;
    }
    const cards = Array.from(document.querySelectorAll("[data-card] a.similar"));
    const at = cards.indexOf(document.activeElement);
    // Arrow keys scroll the page until a card has focus; j and k always move.
    const step = NEXT.includes(event.key) ? 1 : PREVIOUS.includes(event.key) ? -1 : 0;
    if (!step || !cards.length || (at < 0 && event.key.startsWith("Arrow"))) return;
    event.preventDefault();
    const next = at < 0 ? (step > 0 ? 0 : cards.length - 1) : Math.min(Math.max(at + step, 0), cards.length - 1);
    cards[next].focus();
    cards[next].scrollIntoView({ block: "nearest" });
  });
})();
