"""Lhotse and Hugging Face `datasets` load a copied dataset as a trainer would, with the real libraries: one
epoch each, every sample equal to soundfile's read of the clip, every transcript with its own audio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lhotse import CutSet, Fbank
from lhotse.dataset import DynamicBucketingSampler, K2SpeechRecognitionDataset, OnTheFlyFeatures
from lhotse.dataset.input_strategies import AudioSamples

from tests.loaders.helpers import clips, samples


def transcribed(root: Path) -> dict[str, dict]:
    return {clip_id: row for clip_id, row in clips(root).items() if row["transcript_text"] is not None}


def lhotse_cuts(root: Path) -> CutSet:
    """The README's way: the cuts, their relative sources under the dataset's root."""
    return CutSet.from_file(root / "lhotse_cuts.jsonl.gz").with_recording_path_prefix(str(root))


def epoch(cuts: CutSet, dataset: K2SpeechRecognitionDataset) -> list[dict]:
    """One epoch of bucketed batches (at most 6 s of audio each), as a training loop draws them."""
    sampler = DynamicBucketingSampler(cuts, max_duration=6.0, num_buckets=2, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=0)
    return list(loader)


def test_lhotse_trains_a_mono_model_on_mixed_multichannel_clips(mixed_files: Path) -> None:
    """`--channels mix`: every cut mono, so bucketed batches of clips from 1-, 2- and 3-channel objects stack,
    and each transcript comes once, with its clip's audio."""
    rows = transcribed(mixed_files)
    cuts = lhotse_cuts(mixed_files)
    cuts.describe()
    assert {cut.id for cut in cuts} == set(rows) and len(rows) == 5  # the demo's untranscribed clip is left out
    assert {cut.num_channels for cut in cuts} == {1}
    from lhotse import validate

    validate(cuts, read_data=True)
    seen = []
    for batch in epoch(cuts, K2SpeechRecognitionDataset(input_strategy=AudioSamples(), return_cuts=True)):
        inputs, sup = batch["inputs"], batch["supervisions"]
        assert inputs.ndim == 2  # (batch, samples): mono
        for i, cut in enumerate(sup["cut"]):
            row = rows[cut.id]
            expected = samples(mixed_files, row)[:, 0]
            assert np.array_equal(inputs[i, : len(expected)].numpy(), expected), cut.id
            assert sup["text"][i] == row["transcript_text"]
            seen.append(cut.id)
    assert sorted(seen) == sorted(rows), "each transcribed clip once per epoch"
    fbank = K2SpeechRecognitionDataset(input_strategy=OnTheFlyFeatures(Fbank()))
    batches = epoch(cuts, fbank)
    assert sum(len(b["supervisions"]["text"]) for b in batches) == len(rows)
    assert all(b["inputs"].ndim == 3 for b in batches)  # (batch, frames, 80 features)


def test_lhotse_supervisions_carry_language_and_speaker(kept_files: Path) -> None:
    rows = transcribed(kept_files)
    cuts = lhotse_cuts(kept_files)
    for cut in cuts:
        (sup,) = cut.supervisions
        assert sup.text == rows[cut.id]["transcript_text"] and sup.language == rows[cut.id]["language"] == "en"
        audio = cut.load_audio()
        assert np.array_equal(audio.T, samples(kept_files, rows[cut.id])), cut.id  # every channel, exactly
    assert {cut.num_channels for cut in cuts} == {1, 2, 3}


def test_hugging_face_decodes_every_clip_exactly(mixed_files: Path, tmp_path: Path) -> None:
    """`load_dataset(root)` and the README's Audio column, decoded by torchcodec: 16 kHz arrays equal to the clip
    files' samples, with every table column."""
    import datasets

    rows = clips(mixed_files)
    ds = datasets.load_dataset(str(mixed_files), split="train", cache_dir=str(tmp_path / "cache"))
    ds = ds.add_column("audio", [str(mixed_files / p) for p in ds["path"]]).cast_column("audio", datasets.Audio())
    assert len(ds) == len(rows)
    for example in ds:
        row = rows[example["clip_id"]]
        decoded = example["audio"].get_all_samples()  # torchcodec's AudioSamples
        assert decoded.sample_rate == 16_000
        expected = samples(mixed_files, row)[:, 0]
        assert np.array_equal(decoded.data.numpy()[0], expected), row["clip_id"]
        assert example["transcript_text"] == row["transcript_text"] and example["language"] == "en"


def test_hugging_face_decodes_the_parquet_layout_with_no_glue(hf_parquet: Path, tmp_path: Path) -> None:
    """`--layout hf-parquet`: `load_dataset(root)` alone gives decoded audio (every channel), duration in seconds,
    the transcript and the manifest's columns."""
    import datasets

    rows = clips(hf_parquet)
    ds = datasets.load_dataset(str(hf_parquet), split="train", cache_dir=str(tmp_path / "cache"))
    assert len(ds) == len(rows)
    channels = set()
    for example in ds:
        row = rows[example["clip_id"]]
        decoded = example["audio"].get_all_samples()
        assert decoded.sample_rate == 16_000 and example["duration"] == row["num_samples"] / 16_000
        assert np.array_equal(decoded.data.numpy().T, samples(hf_parquet, row)), row["clip_id"]
        assert example["transcript_text"] == row["transcript_text"] and example["language"] == "en"
        channels.add(decoded.data.shape[0])
    assert channels == {1, 2, 3}


def test_lhotse_reads_the_shar_layout_and_trains_on_its_supervised_cuts(mixed_shar: Path) -> None:
    """`--layout lhotse-shar`: `CutSet.from_shar` gives every clip, each cut supervised (the demo's row whose
    object has no transcript is a NO_TRANSCRIPT error), `validate(read_data=True)` passes, and a bucketed epoch
    gives each transcript once."""
    from lhotse import validate

    rows = clips(mixed_shar)
    cuts = CutSet.from_shar(in_dir=str(mixed_shar / "shar"))
    assert sorted(cut.id for cut in cuts) == sorted(rows)
    validate(cuts, read_data=True)
    for cut in cuts:
        assert np.array_equal(cut.load_audio()[0], samples(mixed_shar, rows[cut.id])[:, 0]), cut.id
    assert sorted(rows) == sorted(transcribed(mixed_shar)) and all(cut.supervisions for cut in cuts)
    batches = epoch(cuts, K2SpeechRecognitionDataset(input_strategy=AudioSamples(), return_cuts=True))
    texts = [text for b in batches for text in b["supervisions"]["text"]]
    assert sorted(texts) == sorted(row["transcript_text"] for row in transcribed(mixed_shar).values())
