"""distill.encoders: pooling and embedding losses vs float64, layer-dropped students, metrics,
classification and embedding runs end to end through distill.distill, saved embedder reload."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from tokenizers import BertWordPieceTokenizer
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BertTokenizerFast,
)

import distill
from distill.cli import main
from distill.config import load_config
from distill.data import default_documents
from distill.data.corpus import split_by_hash
from distill.encoders import Pooling, build_encoder_student, encode, losses, pool, save_embedder
from distill.encoders.data import augment_sentences, label_ids, read_labelled, to_sentences
from distill.encoders.evaluate import accuracy_macro_f1, retrieval_agreement
from distill.encoders.models import keeping_layers, set_dropout
from distill.encoders.search import search_encoder_layers
from distill.errors import ConfigError, DataError

# ---------------------------------------------------------------- fixtures: tiny random BERTs


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory) -> BertTokenizerFast:
    """A lower-cased WordPiece tokenizer trained here on the first default documents."""
    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(
        default_documents()[:20],
        vocab_size=400,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    )
    directory = tmp_path_factory.mktemp("wordpiece")
    trainer.save_model(str(directory))
    return BertTokenizerFast.from_pretrained(directory)  # builds the fast tokenizer from vocab.txt


def _bert_config(vocab: int, **extra) -> BertConfig:
    return BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,  # deterministic training steps
        attention_probs_dropout_prob=0.0,
        **extra,
    )


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, wordpiece) -> Path:
    torch.manual_seed(0)
    config = _bert_config(
        len(wordpiece),
        num_labels=2,
        label2id={"prose": 0, "code": 1},
        id2label={0: "prose", 1: "code"},
    )
    directory = tmp_path_factory.mktemp("classifier")
    BertForSequenceClassification(config).save_pretrained(directory)
    wordpiece.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def embedder_dir(tmp_path_factory, wordpiece) -> Path:
    torch.manual_seed(1)
    directory = tmp_path_factory.mktemp("embedder")
    save_embedder(
        BertModel(_bert_config(len(wordpiece))).eval(),
        wordpiece,
        Pooling("mean", True),
        directory,
        64,
    )
    return directory


@pytest.fixture(scope="module")
def far_embedder_dir(tmp_path_factory, wordpiece) -> Path:
    """An embedder whose layers matter: weights drawn with std 0.2 (not 0.02), so its
    2-of-4-layer student starts at a mean cosine of ~0.3 to it (the std-0.02 one: ~0.9995)."""
    torch.manual_seed(1)
    directory = tmp_path_factory.mktemp("far_embedder")
    save_embedder(
        BertModel(_bert_config(len(wordpiece), initializer_range=0.2)).eval(),
        wordpiece,
        Pooling("mean", True),
        directory,
        64,
    )
    return directory


# ---------------------------------------------------------------- float64 references


def _mean_pool_reference(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows = []
    for h, m in zip(hidden.double(), mask, strict=True):
        rows.append(sum(h[t] for t in range(len(m)) if m[t]) / int(m.sum()))
    return torch.stack(rows)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def test_pool_and_embedding_losses_match_float64():
    hidden_s, hidden_t = torch.randn(5, 7, 16), torch.randn(5, 7, 16)
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    s, t = pool(hidden_s, mask, "mean"), pool(hidden_t, mask, "mean")
    s64, t64 = _mean_pool_reference(hidden_s, mask), _mean_pool_reference(hidden_t, mask)
    torch.testing.assert_close(s.double(), s64, atol=1e-6, rtol=0)
    torch.testing.assert_close(pool(hidden_s, mask, "cls"), hidden_s[:, 0])

    mse = sum(float(((a - b) ** 2).mean()) for a, b in zip(s64, t64, strict=True))
    cosine = sum(1 - _cos(a, b) for a, b in zip(s64, t64, strict=True))
    relational = sum(
        sum((_cos(s64[i], s64[j]) - _cos(t64[i], t64[j])) ** 2 for j in range(5)) / 5
        for i in range(5)
    )
    assert float(losses.embedding_mse(s, t)) == pytest.approx(mse, rel=1e-5)
    assert float(losses.embedding_cosine(s, t)) == pytest.approx(cosine, rel=1e-5)
    assert float(losses.relational(s, t)) == pytest.approx(relational, rel=1e-4)
    assert float(losses.embedding_cosine(s, 3 * s)) == pytest.approx(0.0, abs=1e-5)


def test_layer_losses_match_float64():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    states_s = [torch.randn(2, 4, 6) for _ in range(2)]
    states_t = [torch.randn(2, 4, 6) for _ in range(2)]
    maps_s = [torch.randn(2, 3, 4, 4).softmax(-1) for _ in range(2)]
    maps_t = [torch.randn(2, 3, 4, 4).softmax(-1) for _ in range(2)]
    hidden_ref = attention_ref = 0.0
    for b in range(2):
        real = [t for t in range(4) if mask[b, t]]
        for k in range(2):
            diff = (states_s[k][b].double() - states_t[k][b].double()) ** 2
            hidden_ref += sum(float(diff[t].mean()) for t in real) / len(real) / 2
            for h in range(3):
                for q in real:
                    p, r = maps_t[k][b, h, q].double(), maps_s[k][b, h, q].double()
                    attention_ref += float((p * (p.log() - r.log())).sum()) / len(real) / 3 / 2
    assert float(losses.hidden_mse(states_s, states_t, mask)) == pytest.approx(hidden_ref, rel=1e-5)
    assert float(losses.attention_kl(maps_s, maps_t, mask)) == pytest.approx(
        attention_ref, rel=1e-5
    )


def test_metrics_match_references():
    predictions = torch.tensor([0, 1, 2, 2, 1, 0, 2, 1])
    labels = torch.tensor([0, 1, 1, 2, 1, 2, 2, 0])
    metrics = accuracy_macro_f1(predictions, labels, 4)  # class 3 appears nowhere
    assert metrics["accuracy"] == pytest.approx(5 / 8)
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro"))

    teacher = torch.randn(30, 8)
    assert retrieval_agreement(teacher * 2.0, teacher, k=5) == 1.0
    shuffled = teacher[torch.randperm(30)]
    assert retrieval_agreement(shuffled, teacher, k=5) < 0.6
    with pytest.raises(ValueError, match="k"):
        retrieval_agreement(teacher, teacher, k=30)


def test_data_helpers():
    assert label_ids(["code", "prose"], {"prose": 0, "code": 1}, 2) == [1, 0]
    assert label_ids(["1", "0"], None, 2) == [1, 0]
    with pytest.raises(DataError, match="label2id"):
        label_ids(["poetry"], {"prose": 0}, 2)
    with pytest.raises(DataError, match="outside"):
        label_ids(["2"], None, 2)
    sentences = to_sentences(
        ["First sentence has five words. Then a second one follows here.\n\nx = 1"]
    )
    assert sentences == ["First sentence has five words.", "Then a second one follows here."]


def test_layer_dropped_student_copies_teacher_layers(classifier_dir):
    teacher = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    student = build_encoder_student(teacher, [1, 3])
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    torch.testing.assert_close(
        student.bert.encoder.layer[1].attention.self.query.weight,
        teacher.bert.encoder.layer[3].attention.self.query.weight,
    )
    full = build_encoder_student(teacher, [0, 1, 2, 3])
    ids = torch.randint(5, 100, (2, 9))
    torch.testing.assert_close(full(input_ids=ids).logits, teacher(input_ids=ids).logits)


# ---------------------------------------------------------------- end to end


def _labelled_jsonl(path: Path) -> Path:
    sentences = to_sentences(default_documents()[:40])[:120]
    rows = [{"text": s, "label": "code" if '"' in s else "prose"} for s in sentences]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_classification_end_to_end(tmp_path, classifier_dir):
    config = {
        "name": "cls",
        "output_dir": str(tmp_path / "runs"),
        "task": "classification",
        "baseline": True,
        "teacher": {"path": str(classifier_dir)},
        "student": {"layers": [0, 3]},
        "data": {"path": str(_labelled_jsonl(tmp_path / "rows.jsonl")), "heldout_fraction": 0.25},
        "loss": {"alpha": 0.2},
        "train": {
            "steps": 12,
            "batch_size": 8,
            "lr": 2e-3,
            "warmup_steps": 0,
            "threads": 1,
            "device": "cpu",
        },
        "encoder": {"hidden_weight": 1.0, "attention_weight": 1.0, "max_length": 48},
        "eval": {"speed": False},
    }
    result = distill.distill(config)
    report = json.loads((result.run_dir / "report.json").read_text())
    models = report["models"]
    assert set(models) == {"teacher", "student_before", "student_after", "student_labels_only"}
    assert models["student_after"]["params"] < models["teacher"]["params"]
    # macro F1 recomputed with sklearn from the saved student's predictions (below)
    assert set(report["retention"]) == {"accuracy", "macro_f1", "top1_agreement"}
    records = [
        json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(records) == 12 and {"ce", "divergence", "hidden", "attention"} <= set(records[0])
    assert records[-1]["loss"] < records[0]["loss"]
    reloaded = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "student").eval()
    tokenizer = AutoTokenizer.from_pretrained(result.run_dir / "student")
    batch = tokenizer(
        ["A class definition.", "The for statement"], padding=True, return_tensors="pt"
    )
    torch.testing.assert_close(reloaded(**batch).logits, result.student.eval()(**batch).logits)
    # The reported scores against sklearn on the saved student's held-out predictions.
    rows = read_labelled(tmp_path / "rows.jsonl")
    _, heldout = split_by_hash([text for text, _ in rows], 0.25)  # <= 1000 texts: all scored
    texts, labels = [rows[i][0] for i in heldout], [rows[i][1] for i in heldout]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")
    with torch.no_grad():
        predicted = reloaded(**batch).logits.argmax(-1).tolist()
    truth = [reloaded.config.label2id[label] for label in labels]
    after = models["student_after"]
    assert after["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert after["accuracy"] == pytest.approx(sum(map(int.__eq__, truth, predicted)) / len(truth))


def test_classification_needs_a_teacher_path(tmp_path):
    with pytest.raises(ConfigError, match="teacher.path"):
        distill.distill({"task": "classification", "output_dir": str(tmp_path)})


def test_encoder_runs_under_torchrun_are_refused_before_any_work(tmp_path, monkeypatch):
    """Encoder runs train in one process: WORLD_SIZE > 1 raises one line before any work."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="without torchrun"):
        distill.distill({"task": "embedding", "name": "e", "output_dir": str(tmp_path)})
    assert not (tmp_path / "e").exists()


def test_embedding_end_to_end_and_reload(tmp_path, far_embedder_dir):
    embedder_dir = far_embedder_dir
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(default_documents()[:40]))
    result = distill.distill(
        {
            "name": "emb",
            "output_dir": str(tmp_path / "runs"),
            "task": "embedding",
            "teacher": {"path": str(embedder_dir)},
            "data": {"path": str(corpus), "heldout_fraction": 0.2},
            "train": {
                "steps": 15,
                "batch_size": 8,
                "lr": 5e-4,
                "warmup_steps": 0,
                "threads": 1,
                "device": "cpu",
            },
            "encoder": {
                "max_length": 48,
                "eval_texts": 40,
                "retrieval_k": 5,
                "relational_weight": 1.0,
                "freeze_embeddings": True,
            },
        }
    )
    models = result.report["models"]
    teacher_table = AutoModel.from_pretrained(embedder_dir).get_input_embeddings().weight
    assert torch.equal(result.student.get_input_embeddings().weight, teacher_table)
    first = result.report["student_layers"][0]  # the layers moved, the table did not
    assert not torch.equal(
        result.student.encoder.layer[0].attention.self.query.weight,
        AutoModel.from_pretrained(embedder_dir).encoder.layer[first].attention.self.query.weight,
    )
    assert result.student.config.num_hidden_layers == 2  # every second of 4 layers
    assert models["teacher"]["cosine_to_teacher"] == pytest.approx(1.0)
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert {"mse", "cosine", "relational"} <= set(records[0])
    assert sum(r["loss"] for r in records[-3:]) < sum(r["loss"] for r in records[:3])
    before, after = (
        models[name]["cosine_to_teacher"] for name in ("student_before", "student_after")
    )
    assert before < 0.5  # the pair starts far from 1 (measured: 0.32) ...
    assert after > before + 0.25  # ... and 15 steps move the student towards it (0.78)
    assert models["student_after"]["texts_per_s"] > 0
    assert {"cosine_to_teacher", "retrieval_agreement", "texts_per_s"} <= set(
        result.report["retention"]
    )

    (result.run_dir / "report.md").unlink()
    main(["report", str(result.run_dir)])  # the CLI rebuilds an encoder run's report from files
    assert "| student_after |" in (result.run_dir / "report.md").read_text()

    # Reload with plain transformers + mean pooling + L2 normalisation, as the saved files say.
    student_dir = result.run_dir / "student"
    modules = json.loads((student_dir / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == [
        "Transformer",
        "Pooling",
        "Normalize",
    ]
    assert json.loads((student_dir / "1_Pooling" / "config.json").read_text())[
        "pooling_mode_mean_tokens"
    ]
    model = AutoModel.from_pretrained(student_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    texts = [
        "A class definition defines a class object.",
        "Exceptions are raised when errors occur.",
    ]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    reloaded = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    expected = encode(result.student, tokenizer, texts, Pooling("mean", True), max_length=48)
    torch.testing.assert_close(reloaded, expected, atol=1e-6, rtol=0)


def test_classification_crash_then_resume_is_bit_identical(tmp_path, classifier_dir, monkeypatch):
    """Crash in the middle of training; ``distill.distill(..., resume=True)`` (what ``distill run
    --resume`` calls) ends with the same weights and one metrics record per step."""
    import distill.pipelines.encoder_run as encoder_run

    config = {
        "output_dir": str(tmp_path / "runs"),
        "task": "classification",
        "teacher": {"path": str(classifier_dir)},
        "student": {"layers": [0, 3]},
        "data": {"path": str(_labelled_jsonl(tmp_path / "rows.jsonl")), "heldout_fraction": 0.25},
        "loss": {"alpha": 0.2, "alpha_schedule": "linear", "alpha_end": 0.6, "divergence": "jsd"},
        "train": {
            "steps": 8,
            "batch_size": 8,
            "lr": 2e-3,
            "warmup_steps": 2,
            "threads": 1,
            "device": "cpu",
        },
        "checkpoint": {"every": 3, "keep": 1},
        "encoder": {"max_length": 32},
        "eval": {"speed": False},
    }
    straight = distill.distill({**config, "name": "straight"})

    forward = encoder_run._forward
    calls = {"student": 0}

    def crashing(model, batch, run_config):
        if model.training:
            calls["student"] += 1
            if calls["student"] == 5:  # step 5: the newest checkpoint is step 3
                raise KeyboardInterrupt
        return forward(model, batch, run_config)

    monkeypatch.setattr(encoder_run, "_forward", crashing)
    with pytest.raises(KeyboardInterrupt):
        distill.distill({**config, "name": "resumed"})
    monkeypatch.setattr(encoder_run, "_forward", forward)
    run_dir = tmp_path / "runs" / "resumed"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000003"]
    with pytest.raises(ConfigError, match="--resume"):
        distill.distill({**config, "name": "resumed"})
    resumed = distill.distill({**config, "name": "resumed"}, resume=True)

    for name, tensor in straight.student.state_dict().items():
        assert torch.equal(tensor, resumed.student.state_dict()[name]), name
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 9))
    models = resumed.report["models"]
    student_file = run_dir / "student" / "model.safetensors"
    assert models["student_after"]["bytes"] == student_file.stat().st_size
    assert models["teacher"]["bytes"] == (classifier_dir / "model.safetensors").stat().st_size


def test_keeping_layers_is_the_layer_dropped_student(embedder_dir, wordpiece):
    teacher = AutoModel.from_pretrained(embedder_dir).eval()
    batch = dict(
        wordpiece(["A class definition.", "The for statement"], padding=True, return_tensors="pt")
    )
    built = build_encoder_student(teacher, [0, 3])
    with torch.no_grad(), keeping_layers(teacher, [0, 3]) as view:
        shared = view(**batch).last_hidden_state
    torch.testing.assert_close(shared, built(**batch).last_hidden_state, atol=0, rtol=0)
    assert len(teacher.encoder.layer) == 4  # restored


@pytest.mark.parametrize("limit", [128, 1])  # exhaustive, then greedy removal
def test_encoder_layer_search_scores_like_built_students(
    embedder_dir, wordpiece, monkeypatch, limit
):
    import distill.encoders.search as encoder_search

    monkeypatch.setattr(encoder_search, "_EXHAUSTIVE_LIMIT", limit)
    teacher = AutoModel.from_pretrained(embedder_dir).eval()
    sentences = to_sentences(default_documents()[:10])[:24]
    batches = [
        dict(wordpiece(sentences[i : i + 8], padding=True, return_tensors="pt")) for i in (0, 8, 16)
    ]

    @torch.no_grad()
    def built_score(layers):
        student = build_encoder_student(teacher, list(layers))
        cosines = [
            F.cosine_similarity(
                pool(student(**b).last_hidden_state, b["attention_mask"], "mean"),
                pool(teacher(**b).last_hidden_state, b["attention_mask"], "mean"),
            )
            for b in batches
        ]
        return float(torch.cat(cosines).mean())

    layers, score = search_encoder_layers(teacher, batches, 2, "embedding")
    assert score == pytest.approx(built_score(layers), abs=1e-6)
    scores = {c: built_score(c) for c in itertools.combinations(range(4), 2)}
    if limit > 1:
        assert tuple(layers) == max(scores, key=scores.get)
    else:  # greedy: no worse than the median candidate, and a valid choice
        assert score >= sorted(scores.values())[len(scores) // 2] - 1e-6
    with pytest.raises(ConfigError, match="num_layers"):
        search_encoder_layers(teacher, batches, 5, "embedding")


def test_embedding_teacher_cache_gives_the_same_losses(tmp_path, embedder_dir, monkeypatch):
    import distill.pipelines.encoder_run as encoder_run

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(default_documents()[:12]))
    forward = encoder_run._forward
    teacher_calls = {"n": 0}

    def counting(model, batch, config):
        teacher_calls["n"] += not model.training
        return forward(model, batch, config)

    monkeypatch.setattr(encoder_run, "_forward", counting)
    losses_by = {}
    for cache in (True, False):
        teacher_calls["n"] = 0
        result = distill.distill(
            {
                "name": f"cache-{cache}",
                "output_dir": str(tmp_path / "runs"),
                "task": "embedding",
                "teacher": {"path": str(embedder_dir)},
                "student": {"search": "none"},
                "data": {"path": str(corpus), "heldout_fraction": 0.2},
                "train": {"steps": 40, "batch_size": 8, "lr": 5e-4, "threads": 1, "device": "cpu"},
                "encoder": {
                    "max_length": 48,
                    "eval_texts": 20,
                    "retrieval_k": 3,
                    "cache_teacher": cache,
                    "relational_weight": 1.0,
                },
                "eval": {"speed": False},
            }
        )
        assert result.report["train_texts"] <= 40 * 8  # the cache applies
        assert (teacher_calls["n"] == 0) == cache
        lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
        losses_by[cache] = [json.loads(line)["loss"] for line in lines]
    assert losses_by[True] == pytest.approx(losses_by[False], rel=1e-4)


def test_set_dropout_changes_the_modules_not_the_config(wordpiece):
    torch.manual_seed(2)
    config = _bert_config(len(wordpiece))
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.3
    model = BertModel(config).train()
    batch = dict(wordpiece(["Exceptions are raised when errors occur."], return_tensors="pt"))
    with torch.no_grad():
        noisy = model(**batch).last_hidden_state
        assert not torch.equal(noisy, model.eval()(**batch).last_hidden_state)
    # embeddings + per layer: attention probabilities, attention output, FFN output
    assert set_dropout(model, 0.0) == 1 + 3 * config.num_hidden_layers
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert model.config.hidden_dropout_prob == 0.3  # a saved student keeps its settings
    with torch.no_grad():  # no dropout left: training-mode forward == evaluation forward
        torch.testing.assert_close(
            model.train()(**batch).last_hidden_state,
            model.eval()(**batch).last_hidden_state,
            atol=0,
            rtol=0,
        )
    with pytest.raises(ValueError, match="dropout"):
        set_dropout(model, 1.0)


def test_student_dropout_applies_to_the_student_only(embedder_dir):
    import distill.pipelines.encoder_run as encoder_run

    for bad in ("encoder.student_dropout=1.0", "encoder.student_dropout=-0.1"):
        with pytest.raises(ConfigError, match="encoder.student_dropout"):
            load_config(overrides=[bad])
    config = load_config(
        overrides=[
            "task=embedding",
            f"teacher.path={embedder_dir}",
            "student.search=none",
            "encoder.student_dropout=0.25",
        ]
    )
    models = encoder_run._prepare_models(config, [], Pooling("mean", True))
    student_p = {m.p for m in models.student.modules() if isinstance(m, torch.nn.Dropout)}
    teacher_p = {m.p for m in models.teacher.modules() if isinstance(m, torch.nn.Dropout)}
    assert student_p == {0.25}
    assert teacher_p == {0.0}  # the fixture's config
    assert models.student.config.hidden_dropout_prob == 0.0


def test_augmented_sentences_come_from_the_training_sentences_only():
    documents = default_documents()[:30]
    train, heldout = to_sentences(documents[:20]), to_sentences(documents[20:])
    variants = augment_sentences(train, 300, seed=0)
    assert len(variants) == len(set(variants)) == 300
    assert not set(variants) & set(train)  # new inputs, not copies
    assert augment_sentences(train, 300, seed=0) == variants  # fixed by the seed
    assert augment_sentences(train, 300, seed=1) != variants
    train_words = {word for sentence in train for word in sentence.split()}
    # held-out words that no training sentence has never appear in a variant
    heldout_only = {word for s in heldout for word in s.split()} - train_words
    assert heldout_only and not heldout_only & {w for v in variants for w in v.split()}
    # every variant is an in-order subsequence of one training sentence or two joined
    joined_pairs = sum(len(v.split()) > max(len(s.split()) for s in train) for v in variants)

    def subsequence(words: list[str], of: list[str]) -> bool:
        rest = iter(of)
        return all(word in rest for word in words)

    for variant in variants[:60]:
        words = variant.split()
        assert any(subsequence(words, s.split()) for s in train) or any(
            words == (a + " " + b).split() for a in train for b in train if a.split()[0] == words[0]
        ), variant
    assert joined_pairs > 0  # some variants are longer than any one sentence
    assert augment_sentences(train, 0, seed=0) == []
    with pytest.raises(DataError, match="encoder.augment"):
        augment_sentences(["one two three four", "five six seven eight"], 500, seed=0)


def test_embedding_run_trains_on_augmented_inputs(tmp_path, embedder_dir, monkeypatch):
    import distill.pipelines.encoder_run as encoder_run

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(default_documents()[:12]))
    cached: list[list[str]] = []
    teacher_cache = encoder_run._teacher_cache

    def recording(config, models, sentences, pooling):
        cached.append(list(sentences))
        return teacher_cache(config, models, sentences, pooling)

    monkeypatch.setattr(encoder_run, "_teacher_cache", recording)
    result = distill.distill(
        {
            "name": "augment",
            "output_dir": str(tmp_path / "runs"),
            "task": "embedding",
            "teacher": {"path": str(embedder_dir)},
            "student": {"search": "none"},
            "data": {"path": str(corpus), "heldout_fraction": 0.2},
            "train": {"steps": 30, "batch_size": 8, "threads": 1, "device": "cpu"},
            "encoder": {"max_length": 48, "eval_texts": 20, "retrieval_k": 3, "augment": 50},
            "eval": {"speed": False},
        }
    )
    evaluation = json.loads((result.run_dir / "evaluation.json").read_text())
    assert evaluation["augmented_texts"] == 50
    (sentences,) = cached
    originals = sentences[: evaluation["train_texts"]]
    assert sentences[len(originals) :] == augment_sentences(originals, 50, seed=0)
    with pytest.raises(ConfigError, match="encoder.augment"):  # refused when the config loads
        load_config(
            overrides=[
                "task=classification",
                "teacher.path=t",
                "data.path=d.csv",
                "encoder.augment=5",
            ]
        )
