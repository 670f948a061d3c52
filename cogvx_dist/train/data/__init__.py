"""The data path: shard index and sample order, micro-batches per rank, mixtures of datasets, streaming from
object storage. Imports nothing else of train/ but its settings and the step's math."""
