"""A picture of the device groups, their ranks, meshes and parallel dimensions."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from . import runtime
from .dispatch import dispatch
from .mesh import DeviceGroup, DeviceMesh

__all__ = ["Placement", "dispatch_picture", "get_device_placement"]

_WIDTH = 80
_PARALLEL = ("pp", "dp", "tp", "ep", "cp", "fsdp")


def _line(text: str = "") -> str:
    return f"│ {text.ljust(_WIDTH - 4)} │"


def _format_ranks(ranks: Any) -> str:
    if isinstance(ranks, list) and len(ranks) > 16:
        return f"{ranks[:6]} ... {ranks[-3:]} ({len(ranks)} total)"
    return str(ranks)


def _parallelism(mesh: DeviceMesh) -> list[str]:
    out = [f"{d.upper()}={mesh._get_world_size_for_dim(d)}" for d in _PARALLEL
           if mesh._get_world_size_for_dim(d) > 1]
    if mesh.ulysses_size and mesh.ulysses_size > 1:
        out.append(f"ULYSSES={mesh.ulysses_size}")
    return out


def _grid(mesh: DeviceMesh) -> list[str]:
    arr = mesh.mesh if mesh.mesh.ndim > 1 else mesh.mesh.reshape(1, -1)
    if arr.ndim > 2:
        return [_line(f"    high-dimensional mesh, shape {arr.shape}")]
    rows, cols = arr.shape
    show_r, show_c = min(rows, 6), min(cols, 10)
    cell = max(4, len(str(int(arr.max()))) + 2)
    out = [_line("      " + "".join(f"{c:^{cell}}" for c in range(show_c)) + (" ⋯" if cols > show_c else ""))]
    out.append(_line("      ╭" + "─" * (cell * show_c + show_c - 1) + "╮"))
    for r in range(show_r):
        body = "│".join(f"{int(arr[r, c]):^{cell}}" for c in range(show_c))
        out.append(_line(f"   {r:>2} │{body}│" + (" ⋯" if cols > show_c else "")))
    if rows > show_r:
        out.append(_line("         ⋮"))
    out.append(_line("      ╰" + "─" * (cell * show_c + show_c - 1) + "╯"))
    return out


def _placement_text(groups: Sequence[DeviceGroup], workers: dict[str, Any]) -> str:
    lines = ["╔" + "═" * (_WIDTH - 2) + "╗",
             "║ " + "DEVICE PLACEMENT TOPOLOGY".center(_WIDTH - 4) + " ║",
             "╚" + "═" * (_WIDTH - 2) + "╝", ""]
    for group in groups:
        lines.append("┌" + "─" * (_WIDTH - 2) + "┐")
        lines.append(_line(f"◈ DeviceGroup: {group.name}"))
        lines.append("├" + "─" * (_WIDTH - 2) + "┤")
        lines.append(_line(f"  ├─ Device Type : {group.device_type}"))
        lines.append(_line(f"  ├─ Ranks       : {_format_ranks(group.ranks)}"))
        place = workers.get(group.name)
        if place is not None:
            lines.append(_line(f"  └─ Workers     : {len(place.addresses)} ({', '.join(place.addresses[:3])}"
                               + (", ...)" if len(place.addresses) > 3 else ")")))
        else:
            lines.append(_line("  └─ Workers     : (not started)"))
        if not group._device_mesh:
            lines.append(_line())
            lines.append(_line("(No device meshes configured)".center(_WIDTH - 4)))
        for comp, mesh in group._device_mesh.items():
            lines.append(_line())
            lines.append(_line(f"  ┌─ DeviceMesh: {comp}"))
            if mesh.mesh_dim_names:
                dims = " × ".join(f"{n}={s}" for n, s in zip(mesh.mesh_dim_names, mesh.mesh.shape))
                lines.append(_line(f"  │  Dimensions : {dims}"))
            par = _parallelism(mesh)
            if par:
                lines.append(_line(f"  │  Parallelism: {', '.join(par)}"))
            lines.append(_line("  │"))
            lines.append(_line("  └─ Mesh Layout:"))
            lines.extend(_grid(mesh))
        lines.append(_line())
        lines.append("└" + "─" * (_WIDTH - 2) + "┘")
        lines.append("")
    return "\n" + "\n".join(lines)


def _placement_html(groups: Sequence[DeviceGroup], workers: dict[str, Any]) -> str:
    parts = ["<div><strong>Device placement</strong>"]
    for group in groups:
        place = workers.get(group.name)
        addrs = ", ".join(html.escape(a) for a in place.addresses) if place is not None else "(not started)"
        parts.append(
            f"<details open><summary>group <code>{html.escape(group.name)}</code> &middot; "
            f"{html.escape(str(group.device_type))} &middot; ranks {html.escape(_format_ranks(group.ranks))}"
            f"</summary><div>workers: {addrs}</div>"
        )
        for comp, mesh in group._device_mesh.items():
            arr = mesh.mesh if mesh.mesh.ndim > 1 else mesh.mesh.reshape(1, -1)
            table = ""
            if arr.ndim == 2:
                body = "".join("<tr>" + "".join(f"<td>{int(v)}</td>" for v in row) + "</tr>" for row in arr)
                table = f"<table>{body}</table>"
            dims = " × ".join(f"{n}={s}" for n, s in zip(mesh.mesh_dim_names or (), mesh.mesh.shape))
            parts.append(f"<div><em>{html.escape(comp)}</em>: {html.escape(dims)} "
                         f"{html.escape(', '.join(_parallelism(mesh)))}{table}</div>")
        parts.append("</details>")
    parts.append("</div>")
    return "".join(parts)


class Placement(str):
    """The placement text; renders as HTML in a notebook."""

    _html: str

    def __new__(cls, text: str, html_text: str = "") -> Placement:
        self = super().__new__(cls, text)
        self._html = html_text or f"<pre>{html.escape(text)}</pre>"
        return self

    def _repr_html_(self) -> str:
        return self._html


def get_device_placement(device_group: Sequence[DeviceGroup] | None = None) -> str:
    """A text picture of the device groups, their ranks, device types and component meshes.

    Parameters
    ----------
    device_group : list of DeviceGroup, optional
        Defaults to the groups passed to ``initialize``.

    Returns
    -------
    Placement
        A ``str`` (print it); in a notebook it renders as HTML.
    """
    session = runtime.process_session()
    groups = device_group if device_group is not None else getattr(session, "groups", None)
    if not groups:
        return Placement("No device group provided.")
    workers = getattr(session, "placements", {}) if device_group is None else {}
    return Placement(_placement_text(list(groups), workers), _placement_html(list(groups), workers))


def dispatch_picture(
    mesh: DeviceMesh, items: int | Sequence[Any], *, dispatch_name: str = "slice_dp", ranks: int | None = None
) -> str:
    """Who gets what: each rank's mesh coordinates, data rank and share of ``items``.

    Parameters
    ----------
    mesh : DeviceMesh
    items : int or sequence
        The batch (or its length: ``range(items)`` is used).
    dispatch_name : str, default 'slice_dp'
        Any registered dispatch strategy.
    ranks : int, optional
        How many ranks receive the call (default: the mesh's world size).

    Returns
    -------
    Placement
        Text (print it) that renders as an HTML table in a notebook.

    Examples
    --------
    >>> print(dispatch_picture(DeviceMesh.from_sizes(dp_size=2, tp_size=2), 6))  # doctest: +NORMALIZE_WHITESPACE
    rank | dp | tp | data rank | gets
       0 |  0 |  0 |         0 | [0, 1, 2]
       1 |  0 |  1 |         0 | [0, 1, 2]
       2 |  1 |  0 |         1 | [3, 4, 5]
       3 |  1 |  1 |         1 | [3, 4, 5]
    """
    batch = list(range(items)) if isinstance(items, int) else list(items)
    n = mesh.world_size if ranks is None else ranks
    pairs = dispatch(dispatch_name, n, (batch,), {}, mesh)
    dims = list(mesh.mesh_dim_names or ())
    stride = max(1, mesh.world_size // n)
    rows = []
    for rank, (args, _) in enumerate(pairs):
        coord = mesh._get_coord_for_rank(rank * stride) or ()
        rows.append([str(rank), *(str(c) for c in coord), str(mesh.get_data_rank_from_global_rank(rank * stride)),
                     str(args[0])])
    header = ["rank", *dims, "data rank", "gets"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:  # right-aligned columns, the last ('gets') as it is
        return " | ".join([*(c.rjust(w) for c, w in zip(cells[:-1], widths)), cells[-1]])

    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" + body + "</table>"
    return Placement("\n".join(line(r) for r in [header, *rows]), table)
