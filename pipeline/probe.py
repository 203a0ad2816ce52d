"""`featurize probe`: a linear probe (logistic regression) on an OUTPUT's stored image features.

CLIP's linear-probe recipe: labelled rows are split train/validation/test (60/20/20, stratified, from --seed); the
inverse regularisation strength C of scikit-learn's LogisticRegression is swept over a log grid (10^-6..10^6 by
decades, then quarter decades around the best) and the C with the best validation accuracy wins (ties: lower
validation log loss, then the smaller C); the probe is refitted on train + validation and tested once.

MODEL_DIR (--out): probe.joblib (the fitted estimator), probe.json (classes, C, seed, the feature identity from
_dataset.json, the source OUTPUT), metrics.json (the sweep, test accuracy, per-class precision and recall).
"""

from __future__ import annotations

import io
import json
import math
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import UserError, first_line
from .labels import check_suffix, table_bytes
from .rescore import ScoredOutput, logits_matrix
from .storage import read_bytes, write_bytes_atomic

SPLIT = {"train": 0.6, "val": 0.2, "test": 0.2}
COARSE_C = [10.0**e for e in range(-6, 7)]
MAX_ITER = 1000
MIN_PER_CLASS = 3  # one row each for train, validation and test


# -- inputs -----------------------------------------------------------------------------------------------------------
def read_labels(path: str, storage_options: dict | None = None) -> tuple[dict[str, str], int]:
    """(uri -> label, rows without a label) from a CSV (or Parquet) file with columns uri and label. A missing label
    (empty, null, or a float column's NaN) leaves the row out; it is never a class named "nan"."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        data = read_bytes(path, storage_options)
    except FileNotFoundError:
        raise UserError(f"--labels {path} does not exist") from None
    try:
        if path.lower().endswith(".parquet"):
            table = pq.read_table(io.BytesIO(data))
        else:
            table = pacsv.read_csv(
                io.BytesIO(data),
                convert_options=pacsv.ConvertOptions(column_types={"uri": pa.string(), "label": pa.string()}),
            )
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"--labels {path} cannot be read ({first_line(exc, 200)})") from None
    missing = [c for c in ("uri", "label") if c not in table.column_names]
    if missing:
        raise UserError(f"--labels {path} has no {' or '.join(missing)} column (it needs uri,label)")
    column = table.column("label")
    if pa.types.is_floating(column.type):
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
    labels: dict[str, str] = {}
    missing_labels = 0
    for uri, label in zip(table.column("uri").to_pylist(), column.cast(pa.string()).to_pylist()):
        if uri is None:
            continue
        if label is None or label == "":
            missing_labels += 1
            continue
        if labels.setdefault(uri, label) != label:
            raise UserError(f"--labels {path} gives {uri} two labels ({labels[uri]!r} and {label!r})")
    if not labels:
        raise UserError(f"--labels {path} holds no labelled rows")
    return labels, missing_labels


def ok_features(source: ScoredOutput, uris: set[str] | None = None):
    """(uris, features [N, D] float32) of the current ok rows, those in `uris` when given, chunk by chunk."""
    for chunk in source.chunks(["uri", "status", "image_features"]):
        keep = pc.fill_null(
            pc.and_(pc.equal(chunk.column("status"), "ok"), pc.is_valid(chunk.column("image_features"))), False
        )
        if uris is not None:
            keep = pc.and_(keep, pc.is_in(chunk.column("uri"), value_set=pa.array(sorted(uris), pa.string())))
        chunk = chunk.filter(keep)
        if chunk.num_rows:
            yield chunk.column("uri").to_pylist(), logits_matrix(chunk.column("image_features"))


def open_features(output: str, storage_options: dict | None) -> ScoredOutput:
    source = ScoredOutput(output, storage_options)
    if source.is_slides:
        raise UserError(
            f"{output} is a slides OUTPUT: its rows are tiles, which a uri,label file cannot name; "
            "the probe takes the OUTPUT of `featurize images`"
        )
    source.require("image_features", "status", why="the probe learns from the stored image features")
    return source


# -- the split and the fit --------------------------------------------------------------------------------------------
def stratified_split(labels: list[str], seed: int) -> dict[str, np.ndarray]:
    """Row indices for train/val/test: per class (in sorted order) a permutation from one seeded generator,
    20 % (at least one) to test, 20 % (at least one) to validation, the rest to train."""
    rng = np.random.default_rng(seed)
    y = np.asarray(labels, dtype=object)
    parts: dict[str, list] = {"train": [], "val": [], "test": []}
    for label in sorted(set(labels)):
        members = np.flatnonzero(y == label)
        if len(members) < MIN_PER_CLASS:
            raise UserError(
                f"class {label!r} has {len(members)} labelled ok row(s); the probe needs at least "
                f"{MIN_PER_CLASS} per class (train, validation, test)"
            )
        members = members[rng.permutation(len(members))]
        n_test = max(1, math.floor(SPLIT["test"] * len(members) + 0.5))
        n_val = max(1, math.floor(SPLIT["val"] * len(members) + 0.5))
        parts["test"].extend(members[:n_test])
        parts["val"].extend(members[n_test : n_test + n_val])
        parts["train"].extend(members[n_test + n_val :])
    return {name: np.sort(np.asarray(idx, dtype=np.int64)) for name, idx in parts.items()}


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=MAX_ITER, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model


def sweep_c(x: np.ndarray, y: np.ndarray, split: dict[str, np.ndarray], seed: int) -> tuple[float, list[dict]]:
    """The C with the best validation accuracy (then lower log loss, then smaller C), and every C tried."""
    from sklearn.metrics import log_loss

    tried: dict[float, dict] = {}

    def score(c: float) -> None:
        if c in tried:
            return
        model = _fit(x[split["train"]], y[split["train"]], c, seed)
        probs = model.predict_proba(x[split["val"]])
        tried[c] = {
            "C": c,
            "val_accuracy": float(np.mean(model.predict(x[split["val"]]) == y[split["val"]])),
            "val_log_loss": float(log_loss(y[split["val"]], probs, labels=model.classes_)),
        }

    def best() -> float:
        return min(tried.values(), key=lambda r: (-r["val_accuracy"], r["val_log_loss"], r["C"]))["C"]

    for c in COARSE_C:
        score(c)
    centre = math.log10(best())
    for step in range(-3, 4):  # quarter decades around the best decade, inside the grid
        exponent = round(centre + step / 4, 6)
        if math.log10(COARSE_C[0]) <= exponent <= math.log10(COARSE_C[-1]):
            score(float(10.0**exponent))
    return best(), sorted(tried.values(), key=lambda r: r["C"])


def train_probe(uris: list[str], features: np.ndarray, labels: list[str], seed: int) -> tuple[object, dict]:
    """The fitted probe (refitted on train + validation) and its metrics (deterministic given seed)."""
    from sklearn.metrics import precision_recall_fscore_support

    if len(set(labels)) < 2:
        raise UserError(f"the labelled ok rows hold {len(set(labels))} class; a probe needs at least 2")
    order = np.argsort(np.asarray(uris, dtype=object), kind="stable")  # independent of the OUTPUT's row order
    x, y = features[order], np.asarray(labels, dtype=object)[order]
    split = stratified_split(list(y), seed)
    c, tried = sweep_c(x, y, split, seed)
    fit_rows = np.sort(np.concatenate([split["train"], split["val"]]))
    model = _fit(x[fit_rows], y[fit_rows], c, seed)
    predicted = model.predict(x[split["test"]])
    classes = [str(k) for k in model.classes_]
    precision, recall, _, support = precision_recall_fscore_support(
        y[split["test"]], predicted, labels=model.classes_, zero_division=0
    )
    metrics = {
        "seed": seed,
        "C": c,
        "classes": classes,
        "feature_dim": int(x.shape[1]),
        "rows": {name: int(len(idx)) for name, idx in split.items()},
        "val_accuracy": next(r["val_accuracy"] for r in tried if r["C"] == c),
        "test_accuracy": float(np.mean(predicted == y[split["test"]])),
        "per_class": {
            k: {"precision": float(p), "recall": float(r), "support": int(s)}
            for k, p, r, s in zip(classes, precision, recall, support)
        },
        "converged": bool(np.all(np.asarray(model.n_iter_) < MAX_ITER)),
        "sweep": tried,
    }
    return model, metrics


def metrics_table(metrics: dict) -> str:
    """The test metrics as a small fixed-width table."""
    width = max(5, *(len(k) for k in metrics["classes"]))
    lines = [f"{'class':<{width}}  precision  recall  support"]
    for name, m in metrics["per_class"].items():
        lines.append(f"{name:<{width}}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['support']:7d}")
    lines.append(
        f"test accuracy {metrics['test_accuracy']:.3f} on {metrics['rows']['test']} rows; C = "
        f"{metrics['C']:.4g} (validation accuracy {metrics['val_accuracy']:.3f}); trained on "
        f"{metrics['rows']['train'] + metrics['rows']['val']} rows"
    )
    return "\n".join(lines)


def predictions(model, source: ScoredOutput) -> pa.Table:
    """uri, label and one probability column per class (p_<class>) for every current ok row."""
    classes = [str(k) for k in model.classes_]
    parts = []
    for uris, features in ok_features(source):
        probs = model.predict_proba(features)
        columns = {
            "uri": pa.array(uris, pa.string()),
            "label": pa.array(np.asarray(model.classes_, dtype=object)[probs.argmax(axis=1)].tolist(), pa.string()),
        }
        columns.update(
            {f"p_{k}": pa.array(probs[:, i].astype(np.float32), pa.float32()) for i, k in enumerate(classes)}
        )
        parts.append(pa.table(columns))
    if not parts:
        return pa.table(
            {
                "uri": pa.array([], pa.string()),
                "label": pa.array([], pa.string()),
                **{f"p_{k}": pa.array([], pa.float32()) for k in classes},
            }
        )
    return pa.concat_tables(parts)


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def save_probe(model_dir: str, model, metrics: dict, source: ScoredOutput, storage_options: dict | None) -> None:
    import joblib
    import sklearn

    from .storage import join

    blob = io.BytesIO()
    joblib.dump(model, blob)
    record = {
        "source": source.url,
        "dataset_version": source.version,
        "identity": source.identity,
        "classes": metrics["classes"],
        "C": metrics["C"],
        "seed": metrics["seed"],
        "feature_dim": metrics["feature_dim"],
        "estimator": "sklearn.linear_model.LogisticRegression",
        "scikit_learn": sklearn.__version__,
        "files": {"model": "probe.joblib", "metrics": "metrics.json"},
    }
    write_bytes_atomic(join(model_dir, "probe.joblib"), blob.getvalue(), storage_options)
    write_bytes_atomic(join(model_dir, "metrics.json"), _json_bytes(metrics), storage_options)
    write_bytes_atomic(join(model_dir, "probe.json"), _json_bytes(record), storage_options)


def load_probe(model_dir: str, storage_options: dict | None = None) -> tuple[object, dict]:
    """(the fitted estimator, probe.json) from a MODEL_DIR. joblib unpickles: load only probes you made."""
    import joblib

    from .storage import join

    record = json.loads(read_bytes(join(model_dir, "probe.json"), storage_options))
    return joblib.load(io.BytesIO(read_bytes(join(model_dir, "probe.joblib"), storage_options))), record


def run_probe(
    output: str,
    labels_path: str,
    seed: int = 0,
    model_dir: str | None = None,
    predict: str | None = None,
    storage_options: dict | None = None,
    echo=print,
) -> dict:
    """Train, test, and optionally save the probe and write predictions; returns the metrics."""
    import importlib.util

    if importlib.util.find_spec("sklearn") is None:
        raise UserError("featurize probe fits with scikit-learn: pip install 'pipeline-featurize[analysis]'")
    if predict:
        check_suffix(predict, "--predict")
    if seed < 0:
        raise UserError(f"--seed must be 0 or more, not {seed}")
    labels, missing_labels = read_labels(labels_path, storage_options)
    if missing_labels:
        echo(f"featurize: {missing_labels} row(s) of {labels_path} have no label; left out")
    source = open_features(output, storage_options)
    uris: list[str] = []
    blocks: list[np.ndarray] = []
    for chunk_uris, features in ok_features(source, set(labels)):
        uris.extend(chunk_uris)
        blocks.append(features)
    unmatched = len(labels) - len(uris)
    if not uris:
        example = next(iter(labels))
        raise UserError(
            f"none of the {len(labels)} labelled uris is an ok row of {output} (e.g. {example}); uris "
            "must be written exactly as the OUTPUT lists them"
        )
    if unmatched:
        echo(f"featurize: {unmatched} of {len(labels)} labelled uris are not ok rows of {output}; left out")
    model, metrics = train_probe(uris, np.concatenate(blocks), [labels[u] for u in uris], seed)
    metrics["labelled_not_found"] = unmatched
    metrics["labels_missing"] = missing_labels
    if model_dir:
        save_probe(model_dir, model, metrics, source, storage_options)
    if predict:
        table = predictions(model, source)
        write_bytes_atomic(predict, table_bytes(table, predict), storage_options)
    return metrics
