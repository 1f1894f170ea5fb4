"""Draw a molecule with its BRICS motifs coloured: a look at the motif level of the hierarchical graph.

    python -m graph.inspect 'O=C(NCCN1CCOCC1)c1ccc(Cl)cc1' --out m.png [--size 600] [--no-standardize]

Each atom takes the colour of its motif (`mol_to_graph(mol).atom_motif`, the ids the shards store),
bonds inside a motif take it too, BRICS-cut bonds stay plain. A legend under the molecule lists each
motif's index, colour and fragment SMILES. Prints one JSON line: {"out", "num_atoms", "num_motifs", "motifs"}.
"""
from __future__ import annotations

import argparse
import json
import sys

from rdkit import Chem
from rdkit.Chem.Draw import rdMolDraw2D
from rdkit.Geometry import Point2D

from .chem import Reject, Standardizer, canonical_order, parse_smiles
from .hierarchy import mol_to_graph

# Light qualitative colours (RGB 0..1) so black atom labels stay readable; reused past 20 motifs.
PALETTE = [
    (0.65, 0.81, 0.89), (0.98, 0.60, 0.60), (0.70, 0.87, 0.54), (0.99, 0.75, 0.44), (0.79, 0.70, 0.84),
    (1.00, 1.00, 0.60), (0.55, 0.83, 0.78), (0.99, 0.80, 0.90), (0.85, 0.85, 0.85), (0.80, 0.92, 0.77),
    (0.74, 0.50, 0.74), (0.50, 0.69, 0.83), (0.99, 0.55, 0.38), (0.90, 0.67, 0.45), (0.60, 0.90, 0.95),
    (0.85, 0.95, 0.45), (0.95, 0.70, 0.95), (0.75, 0.75, 0.55), (0.60, 0.75, 0.60), (0.95, 0.85, 0.70),
]
HAS_CAIRO = hasattr(rdMolDraw2D, "MolDraw2DCairo")  # pip rdkit has it; some conda builds do not


def colour(k: int) -> tuple[float, float, float]:
    return PALETTE[k % len(PALETTE)]


def draw_motifs(mol: Chem.Mol, path: str, size: int = 600) -> list[str]:
    """Write a size x size PNG of `mol` with motifs coloured; return the fragment SMILES in motif order."""
    motif = mol_to_graph(mol).atom_motif.tolist()  # the same code path as preprocessing
    groups = [[] for _ in range(max(motif, default=-1) + 1)]
    for i, k in enumerate(motif):
        groups[k].append(i)
    frags = [Chem.MolFragmentToSmiles(mol, atomsToUse=atoms) for atoms in groups]
    inner = {b.GetIdx(): motif[b.GetBeginAtomIdx()] for b in mol.GetBonds()
             if motif[b.GetBeginAtomIdx()] == motif[b.GetEndAtomIdx()]}  # cut bonds are left out
    lines = [f"{k}: {s}" for k, s in enumerate(frags)]
    (_draw_cairo if HAS_CAIRO else _draw_matplotlib)(mol, motif, inner, lines, path, size)
    return frags


def _legend_layout(n: int, size: int) -> tuple[int, int, int]:
    """(columns, rows shown, line height in px): the legend takes at most a third of the image."""
    line = max(12, size // 32)
    cols = 1 if n <= 6 else 2 if n <= 16 else 3
    rows = min(-(-n // cols), (size // 3) // line)
    return cols, rows, line


def _draw_cairo(mol, motif, inner, lines, path, size):
    cols, rows, line = _legend_layout(len(lines), size)
    legend_h = rows * line + line // 2
    # The molecule gets a panel above the legend strip; the legend is drawn in raw pixel coordinates.
    d = rdMolDraw2D.MolDraw2DCairo(size, size, size, size - legend_h)
    d.drawOptions().clearBackground = True
    d.DrawMolecule(
        rdMolDraw2D.PrepareMolForDrawing(mol),
        highlightAtoms=list(range(len(motif))),
        highlightAtomColors={i: colour(k) for i, k in enumerate(motif)},
        highlightBonds=list(inner),
        highlightBondColors={b: colour(k) for b, k in inner.items()},
    )
    d.SetFontSize(line * 0.7)
    d.SetFillPolys(True)
    col_w, chars = size // cols, int(size / cols / (line * 0.45))  # rough glyph width, to truncate
    for j, text in enumerate(lines[: cols * rows]):
        c, r = divmod(j, rows)
        x, y = c * col_w + line // 2, size - legend_h + r * line + line // 4
        if j == cols * rows - 1 and len(lines) > cols * rows:
            text = f"... +{len(lines) - j} more motifs (see JSON)"
        d.SetColour(colour(j))
        d.DrawRect(Point2D(x, y + 2), Point2D(x + line - 4, y + line - 2), rawCoords=True)
        d.SetColour((0, 0, 0))
        text = text if len(text) <= chars else text[: chars - 1] + "~"
        d.DrawString(text, Point2D(x + line, y + line / 2), 1, rawCoords=True)
    d.FinishDrawing()
    with open(path, "wb") as f:
        f.write(d.GetDrawingText())


def _draw_matplotlib(mol, motif, inner, lines, path, size):
    """Fallback without Cairo: atoms as coloured discs at RDKit 2D coordinates, bonds as lines."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from rdkit.Chem import rdDepictor

    mol = Chem.Mol(mol)  # Compute2DCoords adds a conformer: keep the caller's molecule untouched
    rdDepictor.Compute2DCoords(mol)
    xy = mol.GetConformer().GetPositions()[:, :2]
    cols, rows, line = _legend_layout(len(lines), size)
    frac = (rows * line + line) / size
    fig = Figure(figsize=(size / 100, size / 100), dpi=100)
    ax = fig.add_axes((0, frac, 1, 1 - frac))
    for b in mol.GetBonds():
        i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        k = inner.get(b.GetIdx())
        ax.plot(xy[[i, j], 0], xy[[i, j], 1], color="0.3" if k is None else colour(k),
                lw=2 if k is None else 8, zorder=1, solid_capstyle="round")
    ax.scatter(xy[:, 0], xy[:, 1], s=(line * 1.6) ** 2, c=[colour(k) for k in motif], zorder=2)
    for a in mol.GetAtoms():
        ax.text(*xy[a.GetIdx()], a.GetSymbol(), ha="center", va="center", fontsize=line * 0.5, zorder=3)
    ax.set_aspect("equal", "datalim")
    ax.axis("off")
    shown = lines[: cols * rows]
    fig.legend([Patch(color=colour(k)) for k in range(len(shown))], shown, loc="lower left", ncol=cols,
               fontsize=line * 0.45, frameon=False)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m graph.inspect", description=__doc__.split("\n")[0])
    p.add_argument("smiles")
    p.add_argument("--out", required=True, help="PNG path to write")
    p.add_argument("--size", type=int, default=600, help="image width and height in pixels")
    p.add_argument("--no-standardize", action="store_true",
                   help="draw the molecule as written (parse_smiles only), not its preprocessing parent")
    args = p.parse_args(argv)
    if args.size < 100:
        p.error("--size must be at least 100")
    try:
        if args.no_standardize:
            mol = parse_smiles(args.smiles)
        else:  # exactly what preprocessing stores: parent molecule, canonical atom order
            mol, _ = canonical_order(Standardizer().parent(args.smiles))
    except Reject as e:
        print(f"error: cannot use SMILES {args.smiles!r}: {e}", file=sys.stderr)
        return 2
    try:
        frags = draw_motifs(mol, args.out, args.size)
    except OSError as e:
        print(f"error: cannot write {args.out}: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"out": args.out, "num_atoms": mol.GetNumAtoms(), "num_motifs": len(frags),
                      "motifs": frags}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
