"""graph.inspect: motif drawing of a hand-checked molecule, and the CLI's error path."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image  # a matplotlib dependency, so always present
from rdkit import Chem
from rdkit.Chem import BRICS

import graph.inspect as inspect_mod
from graph.chem import Standardizer, canonical_order

ROOT = Path(__file__).resolve().parents[1]
# Moclobemide. BRICS cuts, by hand: aryl-C(=O), C(=O)-NH (amide), NH-CH2, CH2-N(morpholine): 4 cuts,
# 5 motifs: C=O | NH | CH2CH2 | morpholine | chlorophenyl.
MOCLOBEMIDE = "Clc1ccc(cc1)C(=O)NCCN1CCOCC1"


def parent(smiles):
    return canonical_order(Standardizer().parent(smiles))[0]


def check_png(path, size):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.size == (size, size)
        assert len(set(im.convert("RGB").getdata())) > 5  # not a blank canvas


@pytest.mark.parametrize("cairo", [True, False])  # False: the matplotlib fallback
def test_draw_motifs_moclobemide(tmp_path, monkeypatch, cairo):
    if cairo and not inspect_mod.HAS_CAIRO:
        pytest.skip("this rdkit build has no MolDraw2DCairo")
    monkeypatch.setattr(inspect_mod, "HAS_CAIRO", cairo)
    mol = parent(MOCLOBEMIDE)
    out = tmp_path / "m.png"
    frags = inspect_mod.draw_motifs(mol, str(out), size=400)
    check_png(out, 400)

    cuts = {tuple(sorted(b)) for b, _ in BRICS.FindBRICSBonds(mol)}
    assert len(cuts) == 4
    assert len(frags) == len(cuts) + 1  # BRICS cuts only acyclic bonds: each cut adds one piece
    # Motifs are numbered by lowest atom in canonical order (SMILES O=C(NCCN1CCOCC1)c1ccc(Cl)cc1).
    assert frags == ["C=O", "N", "CC", "C1COCCN1", "Clc1ccccc1"]
    heavy = [Chem.MolFromSmiles(f, sanitize=False).GetNumHeavyAtoms() for f in frags]
    assert sum(heavy) == mol.GetNumHeavyAtoms() == 18


def test_single_motif_molecule(tmp_path):
    # Benzene has no BRICS bond: one motif holding every atom.
    frags = inspect_mod.draw_motifs(parent("c1ccccc1"), str(tmp_path / "b.png"), size=300)
    assert frags == ["c1ccccc1"]
    check_png(tmp_path / "b.png", 300)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "graph.inspect", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_ok(tmp_path):
    out = tmp_path / "cli.png"
    r = run_cli("CC(=O)Nc1ccc(OCC)cc1", "--out", str(out), "--size", "350")  # phenacetin
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["out"] == str(out) and rec["num_atoms"] == 13
    # cuts: CH2-O and O-aryl (ether), aryl-NH and NH-C(=O) (anilide): 5 motifs
    assert rec["num_motifs"] == len(rec["motifs"]) == 5
    check_png(out, 350)


@pytest.mark.parametrize("smiles,reason", [("C1CC(", "unparseable"), ("[Na+].[Cl-]", "too_small")])
def test_cli_rejects_cleanly(tmp_path, smiles, reason):
    out = tmp_path / "bad.png"
    r = run_cli(smiles, "--out", str(out))
    assert r.returncode == 2
    assert reason in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == "" and not out.exists()
