"""Molecule standardisation: pure functions from text to RDKit molecules, or a `Reject` with a reason.

Single molecules (the paper's pre-training and description data) are reduced to their parent:
sanitise, MolStandardize cleanup (remove Hs, disconnect metals, normalise, reionise), keep the largest
organic fragment (salts, counter-ions and free ions go), neutralise, canonical SMILES.

Reaction sides are standardised per component but never reduced: dropping a "salt" or neutralising an
ion there would change the chemistry the model must predict. Atom maps are stripped.
"""
from __future__ import annotations

from dataclasses import dataclass

import selfies
from rdkit import Chem, RDLogger
from rdkit.Chem.MolStandardize import rdMolStandardize

RDLogger.DisableLog("rdApp.*")  # failures become recorded rejects, not log spam

# Reject reason codes (the keys of manifest.json's `rejected_by_reason`).
EMPTY = "empty"
UNPARSEABLE = "unparseable"
SANITIZATION = "sanitization_error"
STANDARDIZATION = "standardization_error"
TOO_SMALL = "too_small"
TOO_LARGE = "too_large"
SELFIES_ERROR = "selfies_error"
INVALID_SELFIES = "invalid_selfies"
MISSING_FIELD = "missing_field"
MALFORMED_ROW = "malformed_row"
BAD_REACTION = "bad_reaction"
WORKER_CRASH = "worker_crash"  # the row killed its worker process every time it was tried (graph.preprocess)


class Reject(Exception):
    """A row that cannot be used, with a reason code and a short human-readable detail."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    min_heavy_atoms: int = 5  # the paper's filter, for single-molecule rows
    max_heavy_atoms: int | None = None  # None: no upper limit


def parse_smiles(smiles: str) -> Chem.Mol:
    """Parse and sanitise, telling a syntax error apart from a chemistry (valence, aromaticity) error."""
    smiles = smiles.strip()
    if not smiles:
        raise Reject(EMPTY)
    mol = Chem.MolFromSmiles(smiles)
    if mol is not None:
        return mol
    raw = Chem.MolFromSmiles(smiles, sanitize=False)
    if raw is None:
        raise Reject(UNPARSEABLE, smiles[:200])
    failed = Chem.SanitizeMol(raw, catchErrors=True)
    raise Reject(SANITIZATION, str(failed))


class Standardizer:
    """Holds the MolStandardize objects (costly to build) for many calls; one per worker."""

    def __init__(self, limits: Limits = Limits()):
        self.limits = limits
        self._largest = rdMolStandardize.LargestFragmentChooser(preferOrganic=True)
        self._uncharger = rdMolStandardize.Uncharger()
        self._normalizer = rdMolStandardize.Normalizer()

    def parent(self, smiles: str) -> Chem.Mol:
        """The standardised parent molecule of one SMILES, with the paper's size filter applied."""
        mol = parse_smiles(smiles)
        try:
            mol = rdMolStandardize.Cleanup(mol)
            mol = self._largest.choose(mol)
            mol = self._uncharger.uncharge(mol)
        except Exception as e:  # RDKit raises several types (ValueError, RuntimeError, Boost errors)
            raise Reject(STANDARDIZATION, str(e)[:200]) from None
        self._check_size(mol, self.limits.min_heavy_atoms)
        return mol

    def component(self, mol: Chem.Mol) -> Chem.Mol:
        """Standardise one component of a reaction side or a mixture: maps stripped, normalised, kept whole."""
        for atom in mol.GetAtoms():
            atom.SetAtomMapNum(0)
        try:
            mol = self._normalizer.normalize(mol)
        except Exception as e:
            raise Reject(STANDARDIZATION, str(e)[:200]) from None
        self._check_size(mol, 1)
        return mol

    def components(self, smiles: str) -> list[Chem.Mol]:
        """Each '.'-separated component of a reaction side, standardised; an empty side gives []."""
        smiles = smiles.strip()
        if not smiles:
            return []
        return [self.component(parse_smiles(part)) for part in smiles.split(".")]

    def _check_size(self, mol: Chem.Mol, minimum: int) -> None:
        n = mol.GetNumHeavyAtoms()
        if n < minimum:
            raise Reject(TOO_SMALL, f"{n} heavy atoms < {minimum}")
        if self.limits.max_heavy_atoms is not None and n > self.limits.max_heavy_atoms:
            raise Reject(TOO_LARGE, f"{n} heavy atoms > {self.limits.max_heavy_atoms}")


def canonical_order(mol: Chem.Mol) -> tuple[Chem.Mol, str]:
    """The molecule renumbered so atom i is the i-th atom of its canonical SMILES (the graph's node
    order, see graph.hierarchy.graph_lists), and that SMILES. For drawing and inspection."""
    from .hierarchy import smiles_order

    smiles, order = smiles_order(mol)
    return Chem.RenumberAtoms(mol, order), smiles


def to_selfies(smiles: str) -> str:
    try:
        return selfies.encoder(smiles, strict=True)
    except Exception as e:  # selfies.EncoderError and the odd KeyError on exotic atoms
        raise Reject(SELFIES_ERROR, str(e)[:200]) from None


def selfies_to_smiles(text: str) -> str:
    """Decode SELFIES to SMILES, rejecting strings that are not SELFIES or decode to nothing."""
    text = text.strip()
    if not text:
        raise Reject(EMPTY)
    try:
        smiles = selfies.decoder(text)
    except Exception as e:
        raise Reject(INVALID_SELFIES, str(e)[:200]) from None
    if not smiles:
        raise Reject(INVALID_SELFIES, text[:200])
    return smiles
