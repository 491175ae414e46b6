"""Synthetic multi-domain benchmark (scenes, documents, charts), generated deterministically with PIL.

``build_benchmark(out_dir, seed=0, ...)`` writes LLaVA-format training data and three test files (yes/no, multiple
choice with every circular rotation, short answer); ``prepare_benchmark(...)`` does it once into vlweave's cache
(``assets.cache_dir()/synthetic/<params hash>/``) and returns the folder.  See :mod:`vlweave.data.synthetic.build`.
"""

from vlweave.data.synthetic.build import (
    CIRCULAR_OFFSET,
    DEFAULTS,
    DOMAINS,
    NAME,
    TEST_FILES,
    VERSION,
    benchmark_dir,
    build_benchmark,
    content_hash,
    is_prepared,
    mc_text,
    params_hash,
    prepare_benchmark,
    prepare_from_name,
    rotate_mc,
)
from vlweave.data.synthetic.common import FORMATS, MC_SUFFIX, SHORT_SUFFIX, Fact

__all__ = [
    "CIRCULAR_OFFSET",
    "DEFAULTS",
    "DOMAINS",
    "FORMATS",
    "MC_SUFFIX",
    "NAME",
    "SHORT_SUFFIX",
    "TEST_FILES",
    "VERSION",
    "Fact",
    "benchmark_dir",
    "build_benchmark",
    "content_hash",
    "is_prepared",
    "mc_text",
    "params_hash",
    "prepare_benchmark",
    "prepare_from_name",
    "rotate_mc",
]
