"""The method registry: one file per method; a key equals the file name and the conf/method/<key>.yaml."""

from mmbalance.methods.base import Method
from mmbalance.methods.baseline import Baseline
from mmbalance.methods.ogm_ge import OGMGE
from mmbalance.methods.unimodal import Unimodal

# Explicit, import-side-effect free (torchtune-style); tests check it equals the YAML files in conf/method.
METHODS: dict[str, type[Method]] = {
    "baseline": Baseline,
    "unimodal": Unimodal,
    "ogm_ge": OGMGE,
}

for _key, _cls in METHODS.items():
    _cls.registry_key = _key


def list_methods() -> list[str]:
    return sorted(METHODS)
