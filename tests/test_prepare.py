"""Bring your own recordings (issue #16, point 1): a folder of mixed-rate, mixed-format, mono and
stereo audio with transcripts in each common layout becomes the corpus stage 01 reads.

The recordings are generated here: six 0.4 s tones at 8, 16, 22.05, 44.1 and 48 kHz, as WAV,
FLAC and Ogg Vorbis, three of them stereo, with transcripts holding digits, symbols, brackets and
accents.
"""
import csv
import subprocess

import numpy as np
import pytest
import soundfile as sf

from fairseq_mamba.checks.data_checks import BAD_LINES_ENV, DataError
from fairseq_mamba.prepare import audio, corpus, text

from conftest import REPO, subprocess_env

# key (path without extension), rate, channels, format, transcript, normalised
RECORDINGS = [
    ("spk1/ch1/spk1-ch1-0000", 8000, 1, "wav", "Call 911 [noise] now", "CALL NINE HUNDRED ELEVEN NOW"),
    ("spk1/ch1/spk1-ch1-0001", 44100, 2, "flac", "It's 3.5% & rising", "IT'S THREE POINT FIVE PERCENT AND RISING"),
    ("spk1/ch1/spk1-ch1-0002", 48000, 1, "ogg", "the 21st of May (laughs)", "THE TWENTY FIRST OF MAY"),
    ("spk2/ch1/spk2-ch1-0000", 16000, 1, "wav", "Hello, world!", "HELLO WORLD"),
    ("spk2/ch1/spk2-ch1-0001", 22050, 2, "flac", "café au lait", "CAFE AU LAIT"),
    ("spk2/ch1/spk2-ch1-0002", 16000, 2, "ogg", "x-ray <unk> 1,000 times", "X RAY ONE THOUSAND TIMES"),
]
SECONDS = 0.4


def write_audio(folder):
    for i, (key, rate, channels, fmt, *_) in enumerate(RECORDINGS):
        t = np.arange(int(SECONDS * rate)) / rate
        x = 0.5 * np.sin(2 * np.pi * (300 + 100 * i) * t)
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        sf.write(folder / f"{key}.{fmt}", np.stack([x, 0 * x], 1) if channels == 2 else x, rate)


def librispeech(folder, tmp):
    for key, *_, raw, _ in RECORDINGS:
        spk, ch, uid = key.split("/")
        with open(folder / spk / ch / f"{spk}-{ch}.trans.txt", "a") as f:
            f.write(f"{uid} {raw}\n")
    return []


def tsv_list(folder, tmp):
    (tmp / "list.tsv").write_text("".join(f"{key}.{fmt}\t{raw}\n" for key, _, _, fmt, raw, _ in RECORDINGS))
    return ["--transcripts", str(tmp / "list.tsv")]


def csv_list(folder, tmp):
    with open(tmp / "list.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["file", "speaker", "transcript"])
        rows.writerows([folder / f"{key}.{fmt}", key[:4], raw] for key, _, _, fmt, raw, _ in RECORDINGS)
    return ["--transcripts", str(tmp / "list.csv")]


def ljspeech(folder, tmp):  # metadata.csv: bare id | raw text | normalised text
    (tmp / "metadata.csv").write_text("".join(f"{key.split('/')[-1]}|raw: {raw}|{raw}\n" for key, *_, raw, _ in RECORDINGS))
    return ["--transcripts", str(tmp / "metadata.csv")]


def per_file(folder, tmp):
    for key, *_, raw, _ in RECORDINGS:
        (folder / f"{key}.txt").write_text(raw + "\n")
    return []


LAYOUTS = {"librispeech": librispeech, "tsv_list": tsv_list, "csv_list": csv_list, "ljspeech": ljspeech,
           "per_file": per_file}


def prepare(*argv):
    return corpus.prepare(corpus.parser().parse_args([str(a) for a in argv] + ["--jobs", "1"]))


def recordings(tmp_path, layout="per_file"):
    folder = tmp_path / "rec"
    write_audio(folder)
    return folder, LAYOUTS[layout](folder, tmp_path)


def read_corpus(out):
    """key -> (relative flac, samples, source rate, channels, words), over the three splits."""
    found = {}
    for split in ("train", "valid", "test"):
        rows = (out / f"{split}.tsv").read_text().splitlines()
        words = (out / f"{split}.wrd").read_text().splitlines()
        assert len(rows) == len(words) > 0
        for row, w in zip(rows, words):
            key, rel, samples, rate, channels = row.split("\t")
            found[key] = (rel, int(samples), int(rate), int(channels), w)
    return found


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_gives_16k_mono_flac_and_normalised_words(layout, tmp_path, monkeypatch):
    monkeypatch.delenv(BAD_LINES_ENV, raising=False)
    folder, extra = recordings(tmp_path, layout)
    summary = prepare(folder, tmp_path / "out", *extra, "--valid", "0.2", "--test", "0.2")
    found = read_corpus(tmp_path / "out")
    assert sorted(found) == sorted(r[0] for r in RECORDINGS)
    for key, rate, channels, _, _, words in RECORDINGS:
        rel, samples, source_rate, source_channels, got = found[key]
        info = sf.info(tmp_path / "out" / rel)
        assert (info.format, info.subtype, info.samplerate, info.channels) == ("FLAC", "PCM_16", 16000, 1)
        assert info.frames == samples == int(SECONDS * 16000)
        assert (source_rate, source_channels, got) == (rate, channels, words)
    assert "train: 4 utterances" in summary and "valid: 1 utterances" in summary
    assert "accents 1, brackets 3, numbers 4, symbols 2" in summary
    assert "stereo or more: 3" in summary


def test_resampling_keeps_the_tone_and_stereo_is_averaged(tmp_path):
    rate, n = 44100, 44100
    tone = 0.8 * np.sin(2 * np.pi * 1000 * np.arange(n) / rate)
    sf.write(tmp_path / "in.wav", np.stack([tone, np.zeros(n)], 1), rate, subtype="FLOAT")
    result = audio.convert(str(tmp_path / "in.wav"), str(tmp_path / "out.flac"))
    y, sr = sf.read(tmp_path / "out.flac")
    assert (result.samples, result.source_rate, result.channels, sr) == (16000, 44100, 2, 16000) and len(y) == 16000
    spectrum = np.abs(np.fft.rfft(y))
    assert np.argmax(spectrum) == 1000  # 1 Hz bins over 1 s
    assert abs(np.sqrt(np.mean(y[1000:-1000] ** 2)) - 0.4 / np.sqrt(2)) < 0.005  # half: the mean of L and R
    assert not (tmp_path / "out.flac.part").exists()


@pytest.mark.parametrize("n,words", [(0, "ZERO"), (15, "FIFTEEN"), (40, "FORTY"), (105, "ONE HUNDRED FIVE"),
                                     (1001, "ONE THOUSAND ONE"), (2_000_019, "TWO MILLION NINETEEN")])
def test_cardinals(n, words):
    assert " ".join(text.cardinal(n)) == words


@pytest.mark.parametrize("raw,words", [("the 1st, 2nd, 3rd, 12th and 20th", "THE FIRST SECOND THIRD TWELFTH AND TWENTIETH"),
                                       ("don't ‘quote’ me", "DON'T QUOTE ME"), ("AT&T {cough}", "AT AND T"),
                                       ("0.05", "ZERO POINT ZERO FIVE")])
def test_normalise(raw, words):
    assert text.normalise(raw)[0] == words


@pytest.mark.parametrize("raw,what", [("5 €", "'€' (U+20AC)"), ("a*b", "'*'"), ("open [note", "unmatched bracket '['"),
                                      ("Привет", "'П'")])
def test_normalise_refuses_what_it_cannot_spell(raw, what):
    with pytest.raises(ValueError, match="has no spelling|unmatched") as err:
        text.normalise(raw)
    assert what in str(err.value) and repr(raw) in str(err.value)


def test_a_transcript_it_cannot_spell_is_named_with_its_line(tmp_path, monkeypatch):
    folder, extra = recordings(tmp_path, "tsv_list")
    lines = (tmp_path / "list.tsv").read_text().splitlines()
    lines[2] = lines[2].split("\t")[0] + "\tcosts 5 € [sic]"
    lines[4] = lines[4].split("\t")[0] + "\t[silence]"
    (tmp_path / "list.tsv").write_text("\n".join(lines) + "\n")
    monkeypatch.delenv(BAD_LINES_ENV, raising=False)
    with pytest.raises(DataError) as err:
        prepare(folder, tmp_path / "out", *extra)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'list.tsv'} line 3: {folder / 'spk1/ch1/spk1-ch1-0002.ogg'} transcript: "
                              "character '€' (U+20AC) in 'costs 5 € [sic]' has no spelling")
    assert "line 5: " in message and "has an empty transcript after normalising '[silence]'" in message
    assert not (tmp_path / "out").exists()  # nothing converted before every transcript is read
    monkeypatch.setenv(BAD_LINES_ENV, "skip")
    summary = prepare(folder, tmp_path / "out", *extra, "--valid", "0.25", "--test", "0.25")
    assert len(read_corpus(tmp_path / "out")) == 4 and "left out: 2 bad" in summary


def test_missing_and_unreadable_audio_are_named(tmp_path, monkeypatch):
    folder, extra = recordings(tmp_path, "librispeech")
    (folder / "spk2/ch1/spk2-ch1-0000.wav").write_text("not audio")
    (folder / "spk1/ch1/spk1-ch1-0000.wav").unlink()
    monkeypatch.delenv(BAD_LINES_ENV, raising=False)
    with pytest.raises(DataError, match=r"(?s)spk1-ch1.trans.txt line 1: .*spk1-ch1-0000.\* does not exist.*"
                                        r"Fix: add the audio file, or delete the line.*1 more problem.*"
                                        r"line 1: .*spk2-ch1-0000.wav cannot be read as audio"):
        prepare(folder, tmp_path / "out")


class Killed(Exception):
    """Stands in for a kill (pytest stops the session on a real KeyboardInterrupt)."""


def test_resumes_after_an_interruption_and_never_overwrites(tmp_path, monkeypatch):
    folder, extra = recordings(tmp_path)
    convert, calls, kill_at = audio.convert, [], [3]

    def interrupted(src, dst):
        calls.append(src)
        if len(calls) == kill_at[0]:
            raise Killed
        return convert(src, dst)

    monkeypatch.setattr(audio, "convert", interrupted)
    with pytest.raises(Killed):
        prepare(folder, tmp_path / "out")
    assert len(list((tmp_path / "out" / "audio").rglob("*.flac"))) == 2 and not (tmp_path / "out" / ".done").exists()
    calls.clear()
    kill_at[0] = None
    prepare(folder, tmp_path / "out")
    assert len(calls) == 4 and len(read_corpus(tmp_path / "out")) == 6  # only the rest converted
    calls.clear()
    assert "already prepared from these inputs: nothing to do" in prepare(folder, tmp_path / "out")
    assert not calls
    with pytest.raises(DataError, match="was prepared from other audio, transcripts or settings"):
        prepare(folder, tmp_path / "out", "--seed", "1")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="is not empty and was not made by this command"):
        prepare(folder, tmp_path / "other")
    with pytest.raises(DataError, match="is inside the audio folder"):
        prepare(folder, folder / "prepared")


def test_split_by_seed_is_stable_and_lists_are_followed(tmp_path):
    folder, _ = recordings(tmp_path)
    prepare(folder, tmp_path / "a", "--seed", "3", "--valid", "0.2", "--test", "0.2")
    prepare(folder, tmp_path / "b", "--seed", "3", "--valid", "0.2", "--test", "0.2")
    for split in ("train", "valid", "test"):
        assert (tmp_path / "a" / f"{split}.tsv").read_text() == (tmp_path / "b" / f"{split}.tsv").read_text()
    (tmp_path / "tr.txt").write_text("spk1/ch1/spk1-ch1-0000\nspk1-ch1-0001\nspk2/ch1/spk2-ch1-0001.flac\n")
    (tmp_path / "va.txt").write_text("spk2-ch1-0000\n")
    (tmp_path / "te.txt").write_text("spk2-ch1-0002\n")
    summary = prepare(folder, tmp_path / "c", "--train-list", tmp_path / "tr.txt", "--valid-list",
                      tmp_path / "va.txt", "--test-list", tmp_path / "te.txt")
    assert (tmp_path / "c" / "valid.tsv").read_text().startswith("spk2/ch1/spk2-ch1-0000\t")
    assert len((tmp_path / "c" / "train.tsv").read_text().splitlines()) == 3 and "1 in no split list" in summary
    assert "warning: test has letters train lacks: M X Y" in summary and "valid has letters" not in summary
    (tmp_path / "te.txt").write_text("spk2-ch1-0002\nnobody\n")
    with pytest.raises(DataError, match=r"te.txt line 2: nobody names no prepared utterance"):
        prepare(folder, tmp_path / "d", "--train-list", tmp_path / "tr.txt", "--valid-list",
                tmp_path / "va.txt", "--test-list", tmp_path / "te.txt")


def test_stage_01_reads_the_prepared_corpus(tmp_path):
    """The README's sequence: 00_prepare.sh, then 01_manifests.sh, as subprocesses."""
    folder, extra = recordings(tmp_path, "librispeech")
    env = subprocess_env()
    env.pop(BAD_LINES_ENV, None)
    for cmd in (["bash", REPO / "run_scripts" / "00_prepare.sh", folder, tmp_path / "corpus", "--valid", "0.2",
                 "--test", "0.2"], ["bash", REPO / "run_scripts" / "01_manifests.sh", tmp_path / "corpus",
                                    tmp_path / "data"]):
        p = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
    assert "train: 4 utterances" in p.stdout
    assert (tmp_path / "data" / "dict.ltr.txt").exists()
    manifest = (tmp_path / "data" / "train.tsv").read_text().splitlines()
    assert manifest[0] == str(tmp_path / "corpus") and all(line.endswith("\t6400") for line in manifest[1:])
    words = (tmp_path / "corpus" / "train.wrd").read_text().splitlines()
    letters = (tmp_path / "data" / "train.ltr").read_text().splitlines()
    assert letters == [" ".join(w.replace(" ", "|")) + " |" for w in words]
