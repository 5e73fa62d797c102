// Typeset the equations that pymdownx.arithmatex (generic mode) marked, on every page Material shows,
// instant navigation included: Material for MkDocs' documented KaTeX setup.
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    delimiters: [
      { left: "$$", right: "$$", display: true },
      { left: "$", right: "$", display: false },
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
    throwOnError: false,
  });
});
