"""trainer.metrics and `python -m trainer.evaluate`: hand-computed cases on real RDKit / NLTK / rouge-score,
both file layouts, clear errors, and (slow) MolT5's own ChEBI-20 test outputs against the MolT5 paper."""
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


def mm(targets, outputs, fmt="auto", canonical=True):
    return M.molecule_metrics(targets, outputs, fmt, canonical=canonical)


# ---------------------------------------------------------------------------------------------- molecules

def test_identical_molecules_written_differently():
    r = mm(["Oc1ccccc1", "N[C@@H](C)C(=O)O"], ["c1ccccc1O", L_ALA])  # same phenol; same L-alanine
    assert r == {"exact_match": 1.0, "bleu": 1.0, "levenshtein": 0.0, "validity": 1.0,
                 "maccs_fts": 1.0, "rdk_fts": 1.0, "morgan_fts": 1.0}
    raw = mm(["Oc1ccccc1"], ["c1ccccc1O"], canonical=False)  # MolT5's raw strings: move the O = 2 edits
    assert raw["levenshtein"] == 2.0 and raw["bleu"] < 1.0 and raw["exact_match"] == 1.0


def test_invalid_and_empty_outputs_count_as_wrong_but_not_in_fts():
    pairs = M.parse_molecules(["CCO", "c1ccccc1", "CCCCO"], ["OCC", "C1CC", ""])  # ok, unclosed ring, empty
    assert [p.output_mol is None for p in pairs] == [False, True, True]
    assert M.exact_match(pairs) == pytest.approx(1 / 3)  # denominator: all 3 rows
    assert M.validity(pairs) == pytest.approx(1 / 3)
    # FTS averages over the one valid output (1.0); counting invalid rows as 0 would give 1/3
    assert M.maccs_fts(pairs) == M.rdk_fts(pairs) == M.morgan_fts(pairs) == 1.0
    # Levenshtein over all rows: 0; "c1ccccc1"->"C1CC" 3 substitutions + 4 deletions; "CCCCO"->"" 5
    assert M.levenshtein(pairs) == pytest.approx((0 + 7 + 5) / 3)
    none_valid = M.parse_molecules(["CCO", "CCN"], ["", "xyz"])
    assert M.validity(none_valid) == 0.0 and M.maccs_fts(none_valid) == 0.0 and M.exact_match(none_valid) == 0.0


def test_invalid_target_is_never_a_match():
    pairs = M.parse_molecules(["C1CC", "CCO"], ["C1CC", "CCO"])
    assert M.exact_match(pairs) == 0.5 and M.validity(pairs) == 0.5
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

    def dp(a, b):
        prev = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            cur = [i]
            for j, cb in enumerate(b, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
            prev = cur
        return prev[-1]

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
    ref = mm(targets, outputs, "smiles")
    assert ref["exact_match"] == pytest.approx(3 / 6) and ref["validity"] == pytest.approx(5 / 6)
    for fmt in ("selfies", "auto"):
        assert mm([enc(t) for t in targets], [enc(o) for o in outputs], fmt) == ref
    # auto decides per string: mixed SMILES/SELFIES rows too
    assert mm(targets, [enc(o) if i % 2 else o for i, o in enumerate(outputs)], "auto") == ref


def test_selfies_detection_and_failures():
    assert M.to_smiles("[C][C][O]") == "CCO"              # auto: bracketed tokens -> SELFIES
    assert M.to_smiles("[C][C][O]", "smiles") == "[C][C][O]"
    assert M.to_smiles("[Na+].[Cl-]") == "[Na+].[Cl-]"    # isolated bracket atoms: SMILES in auto mode
    assert M.to_smiles("[B]") == "[B]" and M.to_smiles("[B]", "selfies") == "B"  # boron atom vs BH3
    assert M.to_smiles("[C][C][O].[Na+1]") == "CCO.[Na+1]"
    assert M.to_smiles("[C][Xyz]", "selfies") is None      # undecodable in selfies mode: invalid row
    r = mm(["[C][C][O]", "[C][C][O]"], ["[C][Xyz]", "[O][C][C]"], "selfies")
    assert r["validity"] == 0.5 and r["exact_match"] == 0.5
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
EXPECTED = {"exact_match": 0.4, "validity": 0.6, "maccs_fts": 1.0, "rdk_fts": 1.0, "morgan_fts": 1.0,
            "levenshtein": (0 + 0 + 1 + 7 + 5) / 5}


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
    assert set(r) == {"exact_match", "bleu", "levenshtein", "validity", "maccs_fts", "rdk_fts", "morgan_fts"}
    for k, v in EXPECTED.items():
        assert r[k] == pytest.approx(v), k
    assert 0.0 < r["bleu"] < 1.0
    assert json.loads(out.read_text()) == r


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
    for k in ("exact_match", "validity", "maccs_fts", "rdk_fts", "morgan_fts"):
        assert r[k] == pytest.approx(EXPECTED[k]), k


def test_cli_property_jsonl_with_numbers(tmp_path, capsys):
    path = tmp_path / "prop.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in [
        {"target": -0.25, "prediction": "-0.20"}, {"target": "1.5", "prediction": "no idea"},
        {"target": 3, "prediction": "2.5 eV"}]) + "\n")
    assert ev.main(["--task", "property", "--predictions", str(path)]) == 0
    assert last_json(capsys.readouterr().out) == {"mae": pytest.approx(0.275), "parsed": pytest.approx(2 / 3),
                                                  "total": 3}


def test_cli_molcap_smiles2caption_layout(tmp_path, capsys):
    rows = [("CCO", "The molecule is an alcohol.", "The molecule is an alcohol."),
            ("CC(=O)O", 'The molecule is a "simple" carboxylic acid.', "The molecule is an acid.")]
    path = write_tsv(tmp_path / "cap.txt", rows, header=("SMILES", "ground truth", "output"))
    assert ev.main(["--task", "molcap", "--predictions", path, "--out", str(tmp_path / "o.json")]) == 0
    r = last_json(capsys.readouterr().out)
    assert set(r) == {"bleu2", "bleu4", "rouge1", "rouge2", "rougeL", "meteor"}
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
    assert abs(M.bleu(pairs, canonical=False) - 0.854) < 0.01          # MolT5: raw strings
    assert abs(M.levenshtein(pairs, canonical=False) - 16.07) < 0.5
    assert M.bleu(pairs) == pytest.approx(0.8234, abs=1e-3)               # ours: RDKit canonical SMILES
    assert M.levenshtein(pairs) == pytest.approx(18.309, abs=1e-2)
