"""`GptTfRecordsProcessor`: packed GPT TFRecords to batches of (features, labels).

Yields `({"input_ids": int32 [b, S], "input_mask": int32 [b, S]}, labels int32 [b, S])`,
b = the per-replica batch size. The order of records is a pure function of the params,
the input context and the data position:

* epoch e reads the pipeline's files in an order shuffled by seed (shuffle_seed, e),
  interleaved `num_parallel_reads` at a time, one record from each in turn;
* records are then shuffled in consecutive blocks of `shuffle_buffer` (a full permutation
  per block, seeded by (shuffle_seed, e, block)): stateless, so independent of
  `tf.random.set_seed` and of how many batches were drawn before;
* multi-worker: with at least as many files as input pipelines, pipeline i reads files
  i, i+n, ...; otherwise every pipeline reads all files and keeps records i, i+n, ...
  (disjoint, together complete either way);
* `data_position` = batches this pipeline already yielded. Since every file's record
  count is known up front (input/shard_index.py), whole epochs are skipped arithmetically
  and only the records of the current epoch before the position are read and dropped
  (unparsed). With `skip_corrupt_records` the readable counts are not known exactly, so
  the skip reads from the start instead; slower, still exact.

Checks that tf.data cannot attribute to a file are done first in Python (shard_index);
the rest run inside the pipeline and fail with the file named in the message: a record of
another length or without a feature, a token id >= model.vocab_size, and a file that
yields fewer records than its framing promised (checksum mismatch inside a record).
"""
from __future__ import annotations

import sys

import tensorflow as tf

from input.errors import InputDataError
from input.records import FEATURE_NAMES
from input.shard_index import ShardFile, index_shards
from config.params import ModelParams, ParamsError, TrainInputParams

__all__ = ["GptTfRecordsProcessor"]

_FILE_BLOCK = 128      # records per bookkeeping step when reading a file


def _check(condition: tf.Tensor, message: tf.Tensor) -> tf.Operation:
    """An assertion whose message is built in the graph (so it can name the file at fault)."""
    return tf.debugging.Assert(condition, [message], summarize=1, name="data_check")


class GptTfRecordsProcessor:
    """Reads the TFRecords of one params section; `key` is its name in messages ("train_input")."""

    def __init__(self, section: TrainInputParams, model: ModelParams, key: str):
        self.section = section
        self.model = model
        self.key = key
        self.seq_len = section.max_sequence_length

    # ----------------------------------------------------------------- files
    def _pipeline_files(self, shards: list[ShardFile], input_context) -> tuple[list[ShardFile], int, int]:
        """(files this pipeline reads, record shard count, record shard index) for `input_context`."""
        if input_context is None or input_context.num_input_pipelines == 1:
            return shards, 1, 0
        count, index = input_context.num_input_pipelines, input_context.input_pipeline_id
        if len(shards) >= count:
            return shards[index::count], 1, 0
        return shards, count, index

    def _read_file(self, path: tf.Tensor, expected: tf.Tensor) -> tf.data.Dataset:
        """(serialized, path) for each record of one file, failing or warning (by setting) when the
        file yields fewer records than its framing promised.

        The bookkeeping runs on blocks of records (a tf.data function call costs microseconds;
        per record it would cost more than the reading), then the blocks are unbatched.
        """
        blocks = tf.data.TFRecordDataset(path, buffer_size=1 << 20).ignore_errors().batch(_FILE_BLOCK)
        end_marker = tf.data.Dataset.from_tensors((tf.constant([], tf.string), True))
        flagged = blocks.map(lambda b: (b, False)).concatenate(end_marker)
        # n = records before this block; for the end marker, the records the file yielded.
        counted = flagged.scan(tf.constant(0, tf.int64), lambda n, x: (n + tf.size(x[0], tf.int64), (x[0], x[1], n)))

        def keep(block, is_end, read):
            return tf.cond(is_end, lambda: self._file_end(path, read, expected), lambda: tf.constant(True))

        checked = counted.filter(keep).map(lambda block, is_end, read: (block, tf.fill(tf.shape(block), path)))
        return checked.unbatch()

    def _file_end(self, path: tf.Tensor, read: tf.Tensor, expected: tf.Tensor) -> tf.Tensor:
        """At a file's end: fail (or, with skip_corrupt_records, report) if records were lost; returns False."""
        complete = tf.equal(read, expected)
        if self.section.skip_corrupt_records:
            def report():
                tf.print(tf.strings.join(["skip_corrupt_records: skipped ", tf.strings.as_string(expected - read),
                                          " unreadable records (checksum mismatch) at the end of ", path]),
                         output_stream=sys.stderr)
                return tf.constant(True)

            done = tf.cond(complete, lambda: tf.constant(True), report)
        else:
            done = _check(complete, tf.strings.join([
                path, ": only ", tf.strings.as_string(read), " of ", tf.strings.as_string(expected),
                " records are readable (checksum mismatch: the file is corrupt); re-run preprocessing to "
                "rewrite it, delete it, or set ", self.key, ".skip_corrupt_records: true to skip the rest"]))
        with tf.control_dependencies([done]):
            return tf.constant(False)

    def _epoch(self, epoch: tf.Tensor, paths: tf.Tensor, counts: tf.Tensor,
               record_shards: int, record_index: int) -> tf.data.Dataset:
        """One pass over this pipeline's records, in the order of `epoch` (see the module docstring)."""
        section = self.section
        seed = tf.stack([tf.constant(section.shuffle_seed, tf.int64), epoch])
        order = tf.range(tf.size(paths, out_type=tf.int64))
        if section.shuffle:
            order = tf.random.experimental.stateless_shuffle(order, seed=seed)
        files = tf.data.Dataset.from_tensor_slices((tf.gather(paths, order), tf.gather(counts, order)))
        parallel = max(1, min(section.num_parallel_reads, int(paths.shape[0])))
        records = files.interleave(self._read_file, cycle_length=parallel, block_length=1,
                                   num_parallel_calls=parallel, deterministic=True)
        if record_shards > 1:
            records = records.shard(record_shards, record_index)
        if section.shuffle:
            records = records.batch(section.shuffle_buffer).enumerate().flat_map(
                lambda block, batch: self._shuffle_block(batch, tf.random.experimental.stateless_fold_in(seed, block)))
        return records

    @staticmethod
    def _shuffle_block(batch, seed) -> tf.data.Dataset:
        serialized, paths = batch
        order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(serialized)[0]), seed=seed)
        return tf.data.Dataset.from_tensor_slices((tf.gather(serialized, order), tf.gather(paths, order)))

    # ----------------------------------------------------------------- parsing
    def _parse(self, serialized: tf.Tensor, paths: tf.Tensor):
        """Batched parse of [b] records into int32 [b, S] tensors, checking length and token range."""
        seq_len, vocab = self.seq_len, self.model.vocab_size
        spec = {name: tf.io.RaggedFeature(tf.int64) for name in FEATURE_NAMES}
        ragged = tf.io.parse_example(serialized, spec, example_names=paths)
        checks, dense = [], {}
        for name in FEATURE_NAMES:
            lengths = ragged[name].row_lengths()                                     # [b]
            bad = tf.not_equal(lengths, seq_len)
            first = tf.argmax(tf.cast(bad, tf.int32))
            message = tf.strings.join([
                tf.gather(paths, first), ": a record has ", tf.strings.as_string(tf.gather(lengths, first)),
                f" values of feature {name} (0: the feature is missing) but {self.key}.max_sequence_length="
                f"{seq_len}; re-run preprocessing with --max-sequence-length {seq_len} or fix the setting"])
            checks.append(_check(tf.logical_not(tf.reduce_any(bad)), message))
        with tf.control_dependencies(checks):
            for name in FEATURE_NAMES:
                dense[name] = tf.reshape(ragged[name].flat_values, [-1, seq_len])       # [b, S]
        for name in ("input_ids", "labels"):
            out_of_range = tf.reduce_any((dense[name] >= vocab) | (dense[name] < 0), axis=1)  # [b]
            first = tf.argmax(tf.cast(out_of_range, tf.int32))
            message = tf.strings.join([
                tf.gather(paths, first), ": token id ", tf.strings.as_string(tf.reduce_max(tf.gather(dense[name], first))),
                f" in {name} is outside model.vocab_size={vocab}; the data was made with another tokenizer: "
                "re-run preprocessing with the model's tokenizer or raise model.vocab_size"])
            checks.append(_check(tf.logical_not(tf.reduce_any(out_of_range)), message))
        with tf.control_dependencies(checks):
            features = {"input_ids": tf.cast(dense["input_ids"], tf.int32),         # [b, S]
                        "input_mask": tf.cast(dense["input_mask"], tf.int32)}       # [b, S]
            labels = tf.cast(dense["labels"], tf.int32)                              # [b, S]
        return features, labels

    # ----------------------------------------------------------------- dataset
    def _per_replica_batch(self, input_context) -> int:
        batch_size = self.section.batch_size
        if input_context is None:
            return batch_size
        if batch_size % input_context.num_replicas_in_sync:
            raise ParamsError(f"{self.key}.batch_size={batch_size} is the global batch and must be divisible "
                              f"by the {input_context.num_replicas_in_sync} replicas in sync; choose a multiple")
        return input_context.get_per_replica_batch_size(batch_size)

    def create_dataset(self, input_context: tf.distribute.InputContext | None = None,
                       data_position: int = 0) -> tf.data.Dataset:
        """The batched dataset of this section; `data_position` batches of it are skipped."""
        section = self.section
        if data_position < 0:
            raise ValueError(f"data_position={data_position} must be >= 0 (batches already yielded)")
        batch = self._per_replica_batch(input_context)
        shards = index_shards(section.data_dirs, seq_len=self.seq_len, vocab_size=self.model.vocab_size,
                              skip_corrupt=section.skip_corrupt_records, key=self.key)
        files, record_shards, record_index = self._pipeline_files(shards, input_context)
        total = sum(f.records for f in files)
        per_epoch = (total - record_index + record_shards - 1) // record_shards   # records this pipeline sees
        if per_epoch == 0:
            pipeline = (f"input pipeline {input_context.input_pipeline_id} of {input_context.num_input_pipelines}"
                        if input_context is not None else "the input pipeline")
            raise InputDataError(f"{self.key}.data_dir: {pipeline} gets no records ({total} in its files); "
                                 "add data or use fewer workers")
        consumed = data_position * batch
        first_epoch, skip = 0, consumed
        if not section.skip_corrupt_records:
            first_epoch, skip = divmod(consumed, per_epoch)

        paths = tf.constant([f.path for f in files])
        counts = tf.constant([f.records for f in files], tf.int64)
        if section.repeat:
            epochs = tf.data.Dataset.counter(first_epoch)
        else:      # one epoch; a position past its end leaves nothing
            epochs = tf.data.Dataset.range(first_epoch, 1)
        records = epochs.flat_map(lambda e: self._epoch(e, paths, counts, record_shards, record_index))
        if skip:
            records = records.skip(skip)
        dataset = records.batch(batch, drop_remainder=section.drop_remainder)
        dataset = dataset.map(self._parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        dataset = dataset.prefetch(section.prefetch_buffer)
        options = tf.data.Options()
        options.deterministic = True
        if input_context is not None:
            # Sharded above; a strategy must not shard again.
            options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return dataset.with_options(options)
