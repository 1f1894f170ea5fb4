"""trainer.metrics and `python -m trainer.evaluate`: hand-computed cases on real RDKit / NLTK / rouge-score,
both file layouts, clear errors, the default keys against a plain re-implementation of MolT5's scripts on
MolT5's own outputs (shipped sample; slow: the full ChEBI-20 test files), and the grounding task."""
import json
import math
import os

import pytest

from conftest import ROOT, cli
from trainer import evaluate as ev
from trainer import metrics as M

MOLT5 = os.path.join(os.path.dirname(ROOT), "shared", "data", "molt5_predictions")
if not os.path.isdir(MOLT5):
    MOLT5 = "/work/shared/data/molt5_predictions"

L_ALA, D_ALA = "C[C@H](N)C(=O)O", "C[C@@H](N)C(=O)O"


def mm(targets, outputs, fmt="auto"):
    return M.molecule_metrics(targets, outputs, fmt)


def dp_levenshtein(a, b):
    """Plain dynamic-programming edit distance (python-Levenshtein's `distance`, which MolT5 calls)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


# ---------------------------------------------------------------------------------------------- molecules

def test_identical_molecules_written_differently():
    r = mm(["Oc1ccccc1", "N[C@@H](C)C(=O)O"], ["c1ccccc1O", L_ALA])  # same phenol; same L-alanine
    assert {k: r[k] for k in ("exact_match", "bleu_canonical", "levenshtein_canonical", "validity",
                              "validity_nonempty", "maccs_fts", "rdk_fts", "morgan_fts")} == {
        "exact_match": 1.0, "bleu_canonical": 1.0, "levenshtein_canonical": 0.0, "validity": 1.0,
        "validity_nonempty": 1.0, "maccs_fts": 1.0, "rdk_fts": 1.0, "morgan_fts": 1.0}
    # the default string keys are MolT5's, on the strings as produced: moving the O is 2 edits
    assert r["levenshtein"] == (2 + dp_levenshtein("N[C@@H](C)C(=O)O", L_ALA)) / 2 and r["bleu"] < 1.0


def test_invalid_and_empty_outputs_count_as_wrong_but_not_in_fts():
    pairs = M.parse_molecules(["CCO", "c1ccccc1", "CCCCO"], ["OCC", "C1CC", ""])  # ok, unclosed ring, empty
    assert [p.output_mol is None for p in pairs] == [False, True, False]  # RDKit parses "" (empty molecule)
    assert M.exact_match(pairs) == pytest.approx(1 / 3)  # denominator: all 3 rows
    assert M.validity(pairs) == pytest.approx(2 / 3)  # MolT5: the empty output parses, so it is "valid"
    assert M.validity_nonempty(pairs) == pytest.approx(1 / 3)  # ours: an empty answer is invalid
    # FTS averages over the valid outputs, the empty one included with similarity 0 (as MolT5): (1 + 0) / 2;
    # counting the invalid row as 0 would give 1/3
    assert M.maccs_fts(pairs) == M.rdk_fts(pairs) == M.morgan_fts(pairs) == 0.5
    # Levenshtein over all rows: "CCO"->"OCC" 2 as produced, 0 canonical; "c1ccccc1"->"C1CC" 3
    # substitutions + 4 deletions; "CCCCO"->"" 5
    assert M.levenshtein(pairs) == pytest.approx((2 + 7 + 5) / 3)
    assert M.levenshtein(pairs, canonical=True) == pytest.approx((0 + 7 + 5) / 3)
    none_valid = M.parse_molecules(["CCO", "CCN"], ["xyz", "C1CC"])
    assert M.validity(none_valid) == 0.0 and M.maccs_fts(none_valid) == 0.0 and M.exact_match(none_valid) == 0.0


def test_invalid_target_is_never_a_match():
    pairs = M.parse_molecules(["C1CC", "CCO", "CCO"], ["C1CC", "CCO", ""])
    assert M.exact_match(pairs) == pytest.approx(1 / 3) and M.validity(pairs) == pytest.approx(2 / 3)
    pairs = pairs[:2]
    assert M.morgan_fts(pairs) == 1.0  # only the row with both molecules valid


def test_stereo_variants_do_not_match_but_fingerprints_ignore_stereo():
    r = mm([L_ALA, "C/C=C/C"], [D_ALA, "C/C=C\\C"])  # enantiomer; E vs Z but-2-ene
    assert r["exact_match"] == 0.0 and r["validity"] == 1.0
    # MACCS, RDKit path and Morgan (useChirality=False, as MolT5) fingerprints do not see stereo: FTS = 1
    assert r["maccs_fts"] == r["rdk_fts"] == r["morgan_fts"] == 1.0
    assert r["levenshtein"] == 1.0  # one '@' / one '/' vs '\'


def test_salts_and_mixtures_compare_as_whole_sets():
    pairs = M.parse_molecules(
        ["CC(=O)[O-].[Na+]", "CC(=O)[O-].[Na+]", "CC(=O)[O-].[Na+]", "CCO.CCO", "CCO.O"],
        ["[Na+].CC(=O)[O-]", "CC(=O)[O-]", "CC(=O)O", "CCO", "O.OCC"])
    hits = [M.exact_match([p]) for p in pairs]
    assert hits == [1.0, 0.0, 0.0, 0.0, 1.0]  # order free; counter-ion, charge and multiplicity matter
    assert pairs[0].output_canonical == pairs[0].target_canonical == "CC(=O)[O-].[Na+]"


def test_char_bleu_hand_computed():
    # hexanol -> heptanol: n-gram precisions 7/8, 6/7, 5/6, 4/5, no brevity penalty: (1/2) ** (1/4)
    assert mm(["CCCCCCO"], ["CCCCCCCO"])["bleu"] == pytest.approx(0.5 ** 0.25)
    assert mm(["CCCCCCO"], [""])["bleu"] == 0.0


def test_edit_distance_matches_dynamic_programming():
    import random

    dp = dp_levenshtein
    assert M.edit_distance("kitten", "sitting") == 3
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("CNO()=1c") for _ in range(rng.randint(0, 90)))
        b = "".join(rng.choice("CNO()=12c") for _ in range(rng.randint(0, 90)))
        assert M.edit_distance(a, b) == dp(a, b)


def test_selfies_and_smiles_inputs_give_the_same_metrics():
    import selfies

    targets = ["CCO", "CC(=O)[O-].[Na+]", L_ALA, "CCCCCCO", "CCCCO", "c1ccccc1"]
    outputs = ["OCC", "[Na+].CC(=O)[O-]", D_ALA, "CCCCCCCO", "", "C1=CC=CC=C1"]
    enc = lambda s: selfies.encoder(s) if s else ""  # noqa: E731
    # the string keys compare the SMILES as produced, which SELFIES decoding rewrites (kekulised benzene):
    # every other key, and the canonical string keys, are the same whatever the format
    same = lambda r: {k: v for k, v in r.items() if k not in ("bleu", "levenshtein")}  # noqa: E731
    ref = mm(targets, outputs, "smiles")
    assert ref["exact_match"] == pytest.approx(3 / 6) and ref["validity"] == pytest.approx(6 / 6)
    assert ref["validity_nonempty"] == pytest.approx(5 / 6)
    for fmt in ("selfies", "auto"):
        assert same(mm([enc(t) for t in targets], [enc(o) for o in outputs], fmt)) == same(ref)
    # auto decides per string: mixed SMILES/SELFIES rows too
    assert same(mm(targets, [enc(o) if i % 2 else o for i, o in enumerate(outputs)], "auto")) == same(ref)
    # as produced = the decoded SELFIES: "[C][C][O]" is scored as "CCO"
    decoded = mm([enc("CCCCCCO")], [enc("CCCCCCCO")], "selfies")
    assert decoded["bleu"] == pytest.approx(0.5 ** 0.25) and decoded["levenshtein"] == 1.0


def test_selfies_detection_and_failures():
    assert M.to_smiles("[C][C][O]") == "CCO"              # auto: bracketed tokens -> SELFIES
    assert M.to_smiles("[C][C][O]", "smiles") == "[C][C][O]"
    assert M.to_smiles("[Na+].[Cl-]") == "[Na+].[Cl-]"    # isolated bracket atoms: SMILES in auto mode
    assert M.to_smiles("[B]") == "[B]" and M.to_smiles("[B]", "selfies") == "B"  # boron atom vs BH3
    assert M.to_smiles("[C][C][O].[Na+1]") == "CCO.[Na+1]"
    assert M.to_smiles("[C][Xyz]", "selfies") is None      # undecodable in selfies mode: invalid row
    r = mm(["[C][C][O]", "[C][C][O]"], ["[C][Xyz]", "[O][C][C]"], "selfies")
    assert r["validity"] == 0.5 and r["exact_match"] == 0.5
    assert r["levenshtein"] == (3 + 2) / 2  # an undecodable output is scored as "" ("CCO" vs "OCC": 2)
    with pytest.raises(ValueError):
        M.to_smiles("CCO", "inchi")


# ---------------------------------------------------------------------------------------------- property

def test_parse_number():
    assert M.parse_number("-0.25") == -0.25
    assert M.parse_number("The HOMO-LUMO gap is about 5.1 eV (2 digits)") == 5.1
    assert M.parse_number("1e-3") == 0.001 and M.parse_number(".5") == 0.5
    assert M.parse_number("\u22122.5") == -2.5 and M.parse_number(3) == 3.0
    assert M.parse_number("n/a") is None and M.parse_number("") is None and M.parse_number(None) is None


def test_property_metrics_over_parsed_rows():
    targets = ["-0.25", "1.5", "3", "unknown"]
    outputs = ["The value is -0.20", "I cannot tell", "2.5e0", "4"]
    r = M.property_metrics(targets, outputs)
    # parsed: outputs 1, 3, 4 of 4; MAE over rows where both parse (row 4's target does not): 0.05 and 0.5
    assert r == {"mae": pytest.approx(0.275), "parsed": 0.75, "total": 4}
    assert isinstance(r["total"], int)
    assert M.property_metrics(["1"], ["none"]) == {"mae": None, "parsed": 0.0, "total": 1}


# ---------------------------------------------------------------------------------------------- text

@pytest.fixture(scope="module")
def bert():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(M.default_text_tokenizer_path())


def test_wordpieces(bert):
    assert M.wordpieces("The molecule is a quinolinemonocarboxylate.", bert) == [
        "the", "molecule", "is", "a", "qui", "##no", "##line", "##mon", "##oca", "##rb", "##ox", "##yla",
        "##te", "."]
    assert M.wordpieces("[CLS] an acid [SEP] [PAD]", bert) == ["an", "acid"]
    assert M.wordpieces("one two three four", bert, max_length=3) == ["one", "two", "three"]


def test_token_bleu_hand_computed():
    ref, hyp = "the cat sat on the mat".split(), "the cat sat on a mat".split()
    # precisions: 1-gram 5/6, 2-gram 3/5, 3-gram 2/4, 4-gram 1/3; equal lengths (no brevity penalty)
    assert M.bleu2([ref], [hyp]) == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert M.bleu4([ref], [hyp]) == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    assert M.bleu4([ref], [ref]) == pytest.approx(1.0)
    # brevity penalty exp(1 - 6/4) on a 4-token hypothesis whose n-grams all match
    assert M.bleu2([ref], [ref[:4]]) == pytest.approx(math.exp(1 - 6 / 4))


def test_rouge_hand_computed_without_stemming():
    t, o = "The cat sat on the mat.", "the cat sat on a mat"
    assert M.rouge1([t], [o]) == pytest.approx(5 / 6)   # clipped unigram overlap 5 of 6 each side
    assert M.rouge2([t], [o]) == pytest.approx(3 / 5)   # the cat, cat sat, sat on
    assert M.rougeL([t], [o]) == pytest.approx(5 / 6)   # LCS the cat sat on mat
    assert M.rouge1([t, "an acid"], [o, "an acid"]) == pytest.approx((5 / 6 + 1) / 2)  # mean over rows
    assert M.rouge1(["the cats"], ["the cat"]) == pytest.approx(0.5)  # no stemmer (MolT5's RougeScorer)


def test_meteor_uses_wordnet():
    ref = ["the", "car", "is", "red"]
    same = 1 - 0.5 * (1 / 4) ** 3  # all 4 matched in one chunk: fragmentation penalty only
    assert M.meteor([ref], [ref]) == pytest.approx(same)
    assert M.meteor([ref], [["the", "auto", "is", "red"]]) == pytest.approx(same)  # WordNet synonym
    # 3 of 4 matched in 2 chunks: Fmean 3/4, penalty 0.5 * (2/3)^3
    assert M.meteor([ref], [["the", "bus", "is", "red"]]) == pytest.approx(0.75 * (1 - 0.5 * (2 / 3) ** 3))
    assert M.meteor([ref, ref], [[], ref]) == pytest.approx(same / 2)  # empty output scores 0, kept


def test_install_wordnet_copies_with_lf_line_ends(tmp_path):
    dest = M.install_wordnet(str(tmp_path / "nltk_data"))
    assert dest == str(tmp_path / "nltk_data" / "corpora" / "wordnet")
    assert not os.path.islink(dest) and not os.path.islink(os.path.join(dest, "data.noun"))
    assert not [n for n in os.listdir(tmp_path / "nltk_data" / "corpora") if n.startswith(".wordnet-")]
    with open(os.path.join(dest, "data.noun"), "rb") as f:
        noun = f.read()
    assert b"\r\n" not in noun
    # the byte offsets in index.noun point at the synset lines of data.noun (only true with LF ends)
    with open(os.path.join(dest, "index.noun")) as f:
        dog = next(line for line in f if line.startswith("dog "))
    offset = dog.split()[-1]
    assert noun[int(offset):int(offset) + len(offset)].decode() == offset
    mtime = os.path.getmtime(os.path.join(dest, "data.noun"))
    assert M.install_wordnet(str(tmp_path / "nltk_data")) == dest  # second call: already there
    assert os.path.getmtime(os.path.join(dest, "data.noun")) == mtime


def test_text_metrics_on_a_sentence(bert):
    r = M.text_metrics(["The cat sat on the mat."], ["The cat sat on a mat."], bert)
    # word pieces add '.': 1-gram 6/7, 2-gram 4/6
    assert r["bleu2"] == pytest.approx(math.sqrt(6 / 7 * 4 / 6))
    assert (r["rouge1"], r["rouge2"], r["rougeL"]) == pytest.approx((5 / 6, 3 / 5, 5 / 6))
    # METEOR: 6 of 7 matched; NLTK pairs the hypothesis 'the' with the LAST reference 'the' -> 3 chunks
    assert r["meteor"] == pytest.approx(6 / 7 * (1 - 0.5 * (3 / 6) ** 3))
    assert set(r) == {"bleu2", "bleu4", "rouge1", "rouge2", "rougeL", "meteor"}


# ---------------------------------------------------------------------------------------------- CLI

ROWS = [  # description (MolT5 caption2smiles layout), ground truth, output
    ('"Quoted" start of a description with "quotes', "CCO", "OCC"),
    ("sodium acetate", "CC(=O)[O-].[Na+]", "[Na+].CC(=O)[O-]"),
    ("L-alanine", L_ALA, D_ALA),
    ("benzene", "c1ccccc1", "C1CC"),
    ("butanol", "CCCCO", ""),
]
EXPECTED = {"exact_match": 0.4, "validity": 0.8, "validity_nonempty": 0.6, "maccs_fts": 0.75, "rdk_fts": 0.75,
            "morgan_fts": 0.75, "levenshtein_canonical": (0 + 0 + 1 + 7 + 5) / 5,
            "levenshtein": sum(dp_levenshtein(t, o) for _, t, o in ROWS) / 5}
MOLECULE_KEYS = {"exact_match", "bleu", "levenshtein", "validity", "maccs_fts", "rdk_fts", "morgan_fts",
                 "bleu_canonical", "levenshtein_canonical", "validity_nonempty"}


def write_tsv(path, rows, header=("description", "ground truth", "output")):
    with open(path, "w") as f:
        f.write("\t".join(header) + "\n")
        for r in rows:
            f.write("\t".join(r) + "\n")
    return str(path)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for d, t, o in rows:
            f.write(json.dumps({"instruction": d, "target": t, "prediction": o}) + "\n")
    return str(path)


def last_json(text):
    return json.loads(text.strip().splitlines()[-1])


def test_cli_tsv_molt5_layout_subprocess(tmp_path):
    out = tmp_path / "m.json"
    p = cli("trainer.evaluate", "--task", "forward", "--predictions", write_tsv(tmp_path / "p.tsv", ROWS),
            "--out", str(out), timeout=120)
    assert p.returncode == 0, p.stderr
    r = last_json(p.stdout)
    assert set(r) == MOLECULE_KEYS | {"semantics"} and set(r["semantics"]) == MOLECULE_KEYS
    for k, v in EXPECTED.items():
        assert r[k] == pytest.approx(v), k
    assert 0.0 < r["bleu"] < r["bleu_canonical"] < 1.0
    assert json.loads(out.read_text()) == r
    # the JSON names the formula of each key: MolT5's script for the defaults, m3mol for the variants
    assert r["semantics"]["bleu"].startswith("MolT5 evaluation/mol_translation_metrics.py")
    assert r["semantics"]["validity"].startswith("MolT5 evaluation/fingerprint_metrics.py")
    assert r["semantics"]["bleu_canonical"].startswith("m3mol")


def test_cli_jsonl_layout_gives_the_same_metrics(tmp_path, capsys):
    assert ev.main(["--task", "retrosynthesis", "--predictions", write_tsv(tmp_path / "p.tsv", ROWS)]) == 0
    tsv = last_json(capsys.readouterr().out)
    assert ev.main(["--task", "retrosynthesis", "--predictions", write_jsonl(tmp_path / "p.jsonl", ROWS)]) == 0
    assert last_json(capsys.readouterr().out) == tsv


def test_cli_selfies_file(tmp_path, capsys):
    import selfies

    rows = [(d, selfies.encoder(t), selfies.encoder(o) if o and o != "C1CC" else o) for d, t, o in ROWS]
    rows[3] = ("benzene", selfies.encoder("c1ccccc1"), "[C][Xyz]")  # undecodable SELFIES
    assert ev.main(["--task", "reagent", "--predictions", write_jsonl(tmp_path / "s.jsonl", rows),
                    "--molecule-format", "selfies"]) == 0
    r = last_json(capsys.readouterr().out)
    for k in ("exact_match", "validity", "validity_nonempty", "maccs_fts", "rdk_fts", "morgan_fts"):
        assert r[k] == pytest.approx(EXPECTED[k]), k


def test_cli_property_jsonl_with_numbers(tmp_path, capsys):
    path = tmp_path / "prop.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in [
        {"target": -0.25, "prediction": "-0.20"}, {"target": "1.5", "prediction": "no idea"},
        {"target": 3, "prediction": "2.5 eV"}]) + "\n")
    assert ev.main(["--task", "property", "--predictions", str(path)]) == 0
    r = last_json(capsys.readouterr().out)
    assert set(r.pop("semantics")) == {"mae", "parsed", "total"}
    assert r == {"mae": pytest.approx(0.275), "parsed": pytest.approx(2 / 3), "total": 3}


def test_cli_molcap_smiles2caption_layout(tmp_path, capsys):
    rows = [("CCO", "The molecule is an alcohol.", "The molecule is an alcohol."),
            ("CC(=O)O", 'The molecule is a "simple" carboxylic acid.', "The molecule is an acid.")]
    path = write_tsv(tmp_path / "cap.txt", rows, header=("SMILES", "ground truth", "output"))
    assert ev.main(["--task", "molcap", "--predictions", path, "--out", str(tmp_path / "o.json")]) == 0
    r = last_json(capsys.readouterr().out)
    sem = r.pop("semantics")
    assert set(r) == set(sem) == {"bleu2", "bleu4", "rouge1", "rouge2", "rougeL", "meteor"}
    assert "bert-base-uncased" in sem["bleu2"] and "scibert" in sem["bleu2"]  # the stand-in vocabulary named
    assert all(0.0 < v < 1.0 for v in r.values())
    # ROUGE-1 per row: 1.0, then 4 shared of 5 / 7 tokens (quotes and '.' dropped): 2*4/(5+7)
    assert r["rouge1"] == pytest.approx((1 + 8 / 12) / 2)


def test_cli_errors(tmp_path, capsys):
    bad = write_tsv(tmp_path / "bad.tsv", [("CCO", "CCO", "CCO")], header=("SMILES", "ground truth", "prediction"))
    assert ev.main(["--task", "forward", "--predictions", bad]) == 2
    err = capsys.readouterr().err
    assert "missing column" in err and "'output'" in err and "prediction" in err
    assert ev.main(["--task", "forward", "--predictions", str(tmp_path / "nope.tsv")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "k.jsonl").write_text('{"target": "CCO", "output": "CCO"}\n')
    assert ev.main(["--task", "forward", "--predictions", str(tmp_path / "k.jsonl")]) == 2
    assert "missing key" in capsys.readouterr().err
    (tmp_path / "empty.tsv").write_text("ground truth\toutput\n")
    assert ev.main(["--task", "forward", "--predictions", str(tmp_path / "empty.tsv")]) == 2
    with pytest.raises(SystemExit) as e:
        ev.main(["--task", "translation", "--predictions", bad])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_cli_unloadable_text_tokenizer(tmp_path, capsys, bert):
    path = write_tsv(tmp_path / "cap.txt", [("CCO", "An alcohol.", "An alcohol.")],
                     header=("SMILES", "ground truth", "output"))
    assert ev.main(["--task", "molcap", "--predictions", path,
                    "--text-tokenizer", str(tmp_path / "no-such-tokenizer")]) == 2
    assert "cannot load the text tokenizer" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- MolT5 files

def read_molt5(name):
    path = os.path.join(MOLT5, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} not available")
    targets, outputs, layout = ev.read_predictions(path)
    assert layout == "tsv" and len(targets) == 3300
    return targets, outputs


@pytest.mark.slow
def test_molt5_large_smiles2caption_matches_paper(bert):
    """MolT5 paper (Table 1, MolT5-large): ROUGE-1/2/L 65.4 / 51.0 / 59.4 (must land within 0.5);
    BLEU-2/4 59.4 / 50.8, METEOR 61.4 were computed on SciBERT word pieces, ours on bert-base-uncased."""
    targets, outputs = read_molt5("molt5-large-smiles2caption.txt")
    r = M.text_metrics(targets, outputs, bert)
    assert abs(100 * r["rouge1"] - 65.4) < 0.5
    assert abs(100 * r["rouge2"] - 51.0) < 0.5
    assert abs(100 * r["rougeL"] - 59.4) < 0.5
    assert abs(100 * r["bleu2"] - 59.4) < 1.5 and abs(100 * r["bleu4"] - 50.8) < 1.5
    assert abs(100 * r["meteor"] - 61.4) < 1.5


@pytest.mark.slow
def test_molt5_large_caption2smiles_against_paper():
    """MolT5 paper (Table 2, MolT5-large): BLEU .854, exact .311, Levenshtein 16.07, validity .905 (MACCS
    .834, RDK .746, Morgan .684). The released outputs file gives 3163/3300 valid (.958), 1050 exact."""
    targets, outputs = read_molt5("molt5-large-caption2smiles.txt")
    pairs = M.parse_molecules(targets, outputs, "smiles")
    assert M.validity(pairs) == pytest.approx(3163 / 3300)
    assert M.exact_match(pairs) == pytest.approx(1050 / 3300)
    assert abs(M.bleu(pairs) - 0.854) < 0.01                       # default: MolT5's strings as produced
    assert abs(M.levenshtein(pairs) - 16.07) < 0.5
    assert M.bleu(pairs) == pytest.approx(0.8579, abs=1e-4) and M.levenshtein(pairs) == pytest.approx(15.957, abs=1e-3)
    assert M.bleu(pairs, canonical=True) == pytest.approx(0.8234, abs=1e-3)  # bleu_canonical
    assert M.levenshtein(pairs, canonical=True) == pytest.approx(18.309, abs=1e-2)


# ---------------------------------------------------------------------------------------------- MolT5's formulas

SAMPLE = os.path.join(ROOT, "data", "molt5_sample")


def molt5_reference(path):
    """MolT5's mol_translation_metrics.py + fingerprint_metrics.py, re-done plainly: the TSV as
    csv.DictReader(QUOTE_NONE) reads it, NLTK corpus_bleu over character lists, a DP Levenshtein, InChI
    equality in try/except, fingerprints over the rows whose output RDKit parses."""
    import csv

    from nltk.translate.bleu_score import corpus_bleu
    from rdkit import Chem, DataStructs
    from rdkit.Chem import MACCSkeys, rdFingerprintGenerator

    with open(path) as f:
        rows = [(r["ground truth"], r["output"]) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    bleu = corpus_bleu([[list(gt)] for gt, _ in rows], [list(out) for _, out in rows])
    exact = 0
    for gt, out in rows:
        try:
            exact += Chem.MolToInchi(Chem.MolFromSmiles(out)) == Chem.MolToInchi(Chem.MolFromSmiles(gt))
        except Exception:
            pass
    valid = [(Chem.MolFromSmiles(gt), Chem.MolFromSmiles(out)) for gt, out in rows
             if Chem.MolFromSmiles(out) is not None]
    morgan = rdFingerprintGenerator.GetMorganGenerator(radius=2)  # == AllChem.GetMorganFingerprint(m, 2)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return len(rows), {
        "bleu": bleu, "exact_match": exact / len(rows),
        "levenshtein": mean([dp_levenshtein(out, gt) for gt, out in rows]),
        "validity": len(valid) / len(rows),
        "maccs_fts": mean([DataStructs.TanimotoSimilarity(MACCSkeys.GenMACCSKeys(g), MACCSkeys.GenMACCSKeys(o))
                           for g, o in valid]),
        "rdk_fts": mean([DataStructs.TanimotoSimilarity(Chem.RDKFingerprint(g), Chem.RDKFingerprint(o))
                         for g, o in valid]),
        "morgan_fts": mean([DataStructs.TanimotoSimilarity(morgan.GetSparseCountFingerprint(g),
                                                           morgan.GetSparseCountFingerprint(o)) for g, o in valid]),
    }


def test_default_molecule_keys_are_molt5s_on_its_outputs(capsys):
    """The shipped sample (first 200 rows of MolT5-large caption2smiles): every default key equals MolT5's
    formula; the canonical variants differ (RDKit rewrites the strings)."""
    path = os.path.join(SAMPLE, "molt5-large-caption2smiles.txt")
    n, ref = molt5_reference(path)
    assert n == 200 and 0.9 < ref["validity"] < 1.0  # the sample has invalid outputs
    assert ev.main(["--task", "forward", "--predictions", path, "--molecule-format", "smiles"]) == 0
    r = last_json(capsys.readouterr().out)
    for k, v in ref.items():
        assert r[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k
    assert r["bleu_canonical"] < r["bleu"] and r["levenshtein_canonical"] > r["levenshtein"]


def test_default_caption_keys_are_molt5s_on_its_outputs(bert, capsys):
    """MolT5's text_translation_metrics.py step by step (tokenize with padding='max_length', specials
    filtered, corpus_bleu, meteor_score, RougeScorer.score(out, gt)) on 100 MolT5-large captions."""
    import csv

    import numpy as np
    from nltk.translate.bleu_score import corpus_bleu
    from nltk.translate.meteor_score import meteor_score
    from rouge_score import rouge_scorer

    path = os.path.join(SAMPLE, "molt5-large-smiles2caption.txt")
    with open(path, encoding="utf8") as f:
        rows = [(r["ground truth"], r["output"][6:] if r["output"].startswith("[CLS] ") else r["output"])
                for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    assert len(rows) == 100

    def pieces(text):
        toks = bert.tokenize(text, truncation=True, max_length=512, padding="max_length")
        return [t for t in toks if t not in ("[PAD]", "[CLS]", "[SEP]")]

    refs, hyps = [[pieces(gt)] for gt, _ in rows], [pieces(out) for _, out in rows]
    wn = M.ensure_wordnet()
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    rs = [scorer.score(out, gt) for gt, out in rows]
    ref = {"bleu2": corpus_bleu(refs, hyps, weights=(.5, .5)), "bleu4": corpus_bleu(refs, hyps),
           "meteor": np.mean([meteor_score(r, h, wordnet=wn) for r, h in zip(refs, hyps)]),
           **{k: np.mean([x[k].fmeasure for x in rs]) for k in ("rouge1", "rouge2", "rougeL")}}
    assert ev.main(["--task", "molcap", "--predictions", path]) == 0
    r = last_json(capsys.readouterr().out)
    for k, v in ref.items():
        assert r[k] == pytest.approx(float(v), rel=1e-9), k


def test_old_string_metrics_flag_is_accepted_and_changes_nothing(tmp_path, capsys):
    path = write_tsv(tmp_path / "p.tsv", ROWS)
    assert ev.main(["--task", "forward", "--predictions", path]) == 0
    plain = last_json(capsys.readouterr().out)
    assert ev.main(["--task", "forward", "--predictions", path, "--string-metrics", "canonical"]) == 0
    out = capsys.readouterr()
    assert last_json(out.out) == plain and "no longer needed" in out.err


def test_every_key_is_documented():
    for k in (MOLECULE_KEYS | {"bleu2", "bleu4", "rouge1", "rouge2", "rougeL", "meteor", "mae", "parsed", "total"}
              | set(M.grounding_metrics(["Yes"], ["yes"]))):
        assert k in M.SEMANTICS, k


# ---------------------------------------------------------------------------------------------- grounding

def g(qt, kind):
    return {"task": "grounding", "question_type": qt, "answer_kind": kind}


def test_grounding_yesno_counts_unparseable_and_chance():
    targets = ["Yes", "Yes", "No", "Yes", "3", "3", "1", "2.35", "-0.50", "1.00"]
    outputs = ["yes, it has one.", "The answer is No.", "NO!", "I cannot tell", "There are 3 rings", "2.5",
               "one", "about 2.0", "-0.4", "n/a"]
    metas = [g("has_carboxylic_acid", "yesno")] * 4 + [g("count_rings", "count")] * 3 + [g("property_logp", "number")] * 3
    r = M.grounding_metrics(targets, outputs, metas)
    # yes/no: right, wrong ("No"), right ("NO!"), unparseable -> 2 of 4; counts: 3 right, "2.5" is not a
    # count, "one" unparseable -> 1 of 3
    assert r["yesno_accuracy"] == 0.5 and r["count_accuracy"] == pytest.approx(1 / 3)
    assert r["accuracy"] == pytest.approx(3 / 7)
    # chance: "Yes" is 3 of 4; "3" is 2 of 3; row-weighted (3 + 2) / 7
    assert r["chance_yesno_accuracy"] == 0.75 and r["chance_count_accuracy"] == pytest.approx(2 / 3)
    assert r["chance_accuracy"] == pytest.approx(5 / 7)
    # numbers: rows 1-2 parse: |2.35 - 2.0|, |-0.5 + 0.4|; the median target 1.0 scores |2.35-1|, |-0.5-1|
    assert r["number_mae"] == pytest.approx((0.35 + 0.1) / 2)
    assert r["number_chance_mae"] == pytest.approx((1.35 + 1.5) / 2)
    # parsed: yes/no 3, counts 1 ("2.5" and "one" fail), numbers 2 of 3
    assert r["parsed"] == pytest.approx(6 / 10) and r["total"] == 10
    assert (r["yesno_rows"], r["count_rows"], r["number_rows"]) == (4, 3, 3)
    assert r["per_question_type"] == {
        "has_carboxylic_acid": {"rows": 4, "accuracy": 0.5, "chance": 0.75},
        "count_rings": {"rows": 3, "accuracy": pytest.approx(1 / 3), "chance": pytest.approx(2 / 3)},
        "property_logp": {"rows": 3, "mae": pytest.approx(0.225), "chance": pytest.approx(1.425)}}


def test_grounding_infers_kinds_and_types_without_metadata():
    r = M.grounding_metrics(["Yes", "No", "No", "4", "0.25"], ["Yes", "no", "yes", "4", "0.5"])
    assert (r["yesno_rows"], r["count_rows"], r["number_rows"]) == (3, 1, 1)
    assert set(r["per_question_type"]) == {"yesno", "count", "number"}  # the kind is the type
    assert r["yesno_accuracy"] == pytest.approx(2 / 3) and r["chance_yesno_accuracy"] == pytest.approx(2 / 3)
    assert r["count_accuracy"] == 1.0 and r["number_mae"] == pytest.approx(0.25)
    # per type majority, row-weighted: two yes/no types with opposite majorities each score their own
    two = M.grounding_metrics(["Yes", "Yes", "No", "No", "No", "Yes"], ["x"] * 6,
                              [g("a", "yesno")] * 3 + [g("b", "yesno")] * 3)
    assert two["chance_accuracy"] == pytest.approx((2 + 2) / 6) and two["accuracy"] == 0.0
    only = M.grounding_metrics(["Yes"], ["no"])  # kinds with no rows are null
    assert only["count_accuracy"] is None and only["number_mae"] is None and only["chance_count_accuracy"] is None


def test_cli_grounding_reads_metadata_from_jsonl_and_tsv(tmp_path, capsys):
    rows = [{"target": "Yes", "prediction": "Yes.", "metadata": g("has_ring", "yesno")},
            {"target": "No", "prediction": "yes", "metadata": json.dumps(g("has_ring", "yesno"))},  # shard form
            {"target": "2", "prediction": "2", "question_type": "count_rings"},  # top-level question type
            {"target": "1", "prediction": "0"}]
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    assert ev.main(["--task", "grounding", "--predictions", str(path)]) == 0
    r = last_json(capsys.readouterr().out)
    assert set(r["per_question_type"]) == {"has_ring", "count_rings", "count"}
    assert r["accuracy"] == 0.5 and r["per_question_type"]["has_ring"]["accuracy"] == 0.5
    assert "number_mae" in r["semantics"] and r["number_mae"] is None
    tsv = write_tsv(tmp_path / "g.tsv", [("count_rings", "2", "2"), ("count_rings", "2", "3"), ("has_ring", "Yes", "no")],
                    header=("question_type", "ground truth", "output"))
    assert ev.main(["--task", "grounding", "--predictions", tsv]) == 0
    r = last_json(capsys.readouterr().out)
    assert r["per_question_type"]["count_rings"] == {"rows": 2, "accuracy": 0.5, "chance": 1.0}
    (tmp_path / "bad.jsonl").write_text('{"target": "Yes", "prediction": "no", "metadata": "{not json"}\n')
    assert ev.main(["--task", "grounding", "--predictions", str(tmp_path / "bad.jsonl")]) == 2
    assert "metadata is not a JSON object" in capsys.readouterr().err
