"use strict";
(() => {
  // Count the cells drawn, per table and for the page, into data-dom-* beside the counts
  // written with the page (data-*); a difference is a console error.
  const kinds = {
    cells: "td.cell",
    allowed: "td.cell.allowed",
    blocked: "td.cell.blocked",
    partial: "td.cell.partial",
    changed: "td.cell.changed",
    newlyBlocked: "td.cell.newly-blocked",
    newlyAllowed: "td.cell.newly-allowed",
  };
  const dom = (kind) => "dom" + kind[0].toUpperCase() + kind.slice(1);
  const check = (element, counts, what) => {
    for (const [kind, n] of Object.entries(counts)) {
      element.dataset[dom(kind)] = String(n);
      if (element.dataset[kind] !== String(n)) {
        console.error(`${what}: ${n} ${kind} cells drawn, ${element.dataset[kind]} written`);
      }
    }
  };
  const totals = Object.fromEntries(Object.keys(kinds).map((kind) => [kind, 0]));
  for (const section of document.querySelectorAll("section.port")) {
    const counts = {};
    for (const [kind, selector] of Object.entries(kinds)) {
      counts[kind] = section.querySelectorAll(selector).length;
      totals[kind] += counts[kind];
    }
    check(section, counts, section.dataset.port);
  }
  check(document.getElementById("totals"), totals, "page");

  // The details panel: the clicked cell's title, and both pods.
  const panel = document.getElementById("details");
  const body = panel.querySelector(".body");
  const columnHeader = (td) =>
    td.closest("table").querySelector("thead tr.names").children[td.cellIndex - 1];
  const rowHeader = (td) => td.parentElement.querySelector("th.src");
  let selected = null;
  const show = (td) => {
    if (selected) selected.classList.remove("sel");
    selected = td;
    td.classList.add("sel");
    const [first, ...rest] = td.title.split("\n");
    const heading = document.createElement("h3");
    heading.textContent = first;
    const reasons = document.createElement("pre");
    reasons.textContent = rest.join("\n");
    body.replaceChildren(heading, reasons);
    for (const [label, header] of [["from", rowHeader(td)], ["to", columnHeader(td)]]) {
      const line = document.createElement("p");
      line.className = "end";
      const name = document.createElement("b");
      name.textContent = `${label} `;
      line.append(name, header.title.split("\n").join(" · "));
      body.append(line);
    }
    panel.hidden = false;
  };
  const hide = () => {
    panel.hidden = true;
    if (selected) selected.classList.remove("sel");
    selected = null;
  };
  panel.querySelector("button.close").addEventListener("click", hide);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") hide();
  });

  // The row and column under the pointer are lit.
  let lit = [];
  const light = (headers) => {
    for (const header of lit) header.classList.remove("lit");
    lit = headers.filter(Boolean);
    for (const header of lit) header.classList.add("lit");
  };
  for (const grid of document.querySelectorAll("table.grid")) {
    grid.addEventListener("click", (event) => {
      const td = event.target.closest("td.cell, td.void");
      if (td) show(td);
    });
    grid.addEventListener("mouseover", (event) => {
      const td = event.target.closest("td.cell, td.void");
      light(td ? [rowHeader(td), columnHeader(td)] : []);
    });
    grid.addEventListener("mouseleave", () => light([]));
  }
  document.body.dataset.ready = "yes";
})();
