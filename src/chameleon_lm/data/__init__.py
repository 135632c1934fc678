"""Data: sources → recipes → token shards → mixtures → packed batches.

``sources`` read the on-disk formats (WebDataset, img2dataset folders, parquet, JSONL/OBELICS) as
samples in units; ``recipes`` turn samples into documents; ``tokenize`` writes them as memory-mapped
``shards``; ``mixture`` draws documents from several token datasets in stages; ``packing`` and
``loader`` make training batches. ``synth`` is the built-in shapes world.
"""
