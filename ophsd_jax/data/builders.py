"""tensorflow-datasets builders over user-given files, read back without TensorFlow.

Each task family has a local `GeneratorBasedBuilder`. The builder loads the
source (see `sources.py`), splits it deterministically into train /
validation and writes ArrayRecord files; `as_data_source()` then gives
random access with no TensorFlow at all. Each example is stored as one JSON
text feature, so any normalised example dict round-trips exactly.

The builder config name is a fingerprint of the source spec, the split
settings and the file's bytes, so editing the file or the settings builds
a new dataset instead of silently reusing a stale one.
"""

from __future__ import annotations

import json
import logging
import pathlib

import tensorflow_datasets as tfds

from ophsd_jax.data.sources import TASK_KINDS, check_spec, fingerprint, load_source, split_examples

logger = logging.getLogger(__name__)

_VERSION = "1.0.0"
_REPORT_FILE = "ophsd_load_report.json"


class _LocalInfo(tfds.core.DatasetInfo):
    def initialize_from_bucket(self) -> None:
        # Built from local files, never published to tfds's GCS bucket. (tfds's own version
        # makes a temp dir for the bucket's files before finding none, and leaves it behind:
        # one empty /tmp/tmp*tfds per first build.)
        pass


class _ExamplesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared builder: one JSON text feature per example, order preserved."""

    VERSION = tfds.core.Version(_VERSION)
    task = ""

    def __init__(self, *, source: dict, validation_size: float | int, split_seed: int, data_dir, **kwargs):
        self._source = check_spec(source)
        if self._source["kind"] not in TASK_KINDS[self.task]:
            raise ValueError(
                f"source kind {self._source['kind']!r} does not fit task {self.task!r}; "
                f"use one of {TASK_KINDS[self.task]}"
            )
        self._validation_size = validation_size
        self._split_seed = split_seed
        self.load_report = None
        name = fingerprint(self._source, {"validation_size": validation_size, "split_seed": split_seed})
        config = tfds.core.BuilderConfig(name=name, description=json.dumps(self._source, sort_keys=True))
        super().__init__(data_dir=str(data_dir), config=config, file_format="array_record", **kwargs)

    def _info(self):
        return _LocalInfo(
            builder=self,
            description=f"OPHSD {self.task} examples as JSON text",
            features=tfds.features.FeaturesDict({"id": tfds.features.Text(), "json": tfds.features.Text()}),
            # Keep generation order: our iterator does its own seeded shuffling.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        examples, self.load_report = load_source(self._source)
        if not examples:
            raise ValueError(f"source {self._source} yielded no examples")
        train, val = split_examples(examples, self._validation_size, self._split_seed)
        splits = {"train": self._generate_examples(train)}
        if val:
            splits["validation"] = self._generate_examples(val)
        return splits

    def _generate_examples(self, examples):
        for i, example in enumerate(examples):
            yield i, {"id": example["id"], "json": json.dumps(example, ensure_ascii=False)}


class OphsdMath(_ExamplesBuilder):
    name = "ophsd_math"
    task = "math"


class OphsdLawbench(_ExamplesBuilder):
    name = "ophsd_lawbench"
    task = "lawbench"


class OphsdUspto(_ExamplesBuilder):
    name = "ophsd_uspto"
    task = "uspto"


BUILDERS = {b.task: b for b in (OphsdMath, OphsdLawbench, OphsdUspto)}


class ExampleSource:
    """Random access to a built split, decoding each record into an example dict."""

    def __init__(self, data_source):
        self._data_source = data_source

    def __len__(self) -> int:
        return len(self._data_source)

    def __getitem__(self, index: int) -> dict:
        record = self._data_source[int(index)]
        return json.loads(record["json"].decode("utf-8"))


def build_dataset(
    task: str,
    source: dict,
    *,
    data_dir,
    validation_size: float | int = 0.1,
    split_seed: int = 0,
) -> tuple[dict[str, ExampleSource], dict | None]:
    """Build (once) and open a dataset: returns ({split: source}, load report).

    The load report (rows read, rows skipped with reasons) is saved next to
    the data, so it is available on later opens too.
    """
    if task not in BUILDERS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(BUILDERS)}")
    builder = BUILDERS[task](
        source=source, validation_size=validation_size, split_seed=split_seed, data_dir=data_dir
    )
    builder.download_and_prepare()
    report_path = pathlib.Path(builder.data_dir) / _REPORT_FILE
    if builder.load_report is not None:
        report_path.write_text(json.dumps(builder.load_report, ensure_ascii=False, indent=1), encoding="utf-8")
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.exists() else None
    splits = {name: ExampleSource(ds) for name, ds in builder.as_data_source().items()}
    logger.info("dataset %s at %s: %s", task, builder.data_dir, {k: len(v) for k, v in splits.items()})
    return splits, report
