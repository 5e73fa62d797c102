"""mkdocs hook: fills reference.md with the layer reference generated from the registry's specs."""

from __future__ import annotations

import dataclasses

MARKER = "<!-- LAYER_REFERENCE -->"


def _reference() -> str:
    import seqzoo

    lines = []
    for name in seqzoo.list_layers():
        spec = seqzoo.layer_spec(name)
        lines += [f"## `{name}`", "", spec.description or "", ""]
        lines += [f"*Plugin* `{spec.plugin}` ({spec.distribution} {spec.version}), *kind* {spec.kind}.", ""]
        try:
            layer = seqzoo.create_layer(name, 768, **({"num_heads": 12} if "num_heads" in spec.field_names() else {}))
            a, b = layer.state_size(1024), layer.state_size(16384)
            lines += [f"State per batch element at d_model 768: {a:,} scalars after 1k tokens, {b:,} after 16k.", ""]
        except Exception as exc:  # noqa: BLE001 - the page says what failed instead of breaking the build
            lines += [f"(could not build at d_model 768: {type(exc).__name__}: {exc})", ""]
        lines += ["| option | type | default | help |", "|---|---|---|---|"]
        for f in spec.fields:
            default = "required" if f.default is dataclasses.MISSING else f"`{f.default!r}`"
            lines.append(f"| `{f.name}` | `{f.type_name}` | {default} | {f.help} |")
        lines.append("")
    failures = seqzoo.plugin_failures()
    if failures:
        lines += ["## Plugins that failed to load when this page was built", ""]
        lines += [f"- `{n}`: {why}" for n, why in failures.items()]
    return "\n".join(lines)


def on_page_markdown(markdown, page, config, files):
    if MARKER in markdown:
        return markdown.replace(MARKER, _reference())
    return markdown
