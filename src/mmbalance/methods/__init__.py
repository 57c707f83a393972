"""The method registry: one file per method; a key equals the file name and the conf/method/<key>.yaml."""

from mmbalance.methods.agm import AGM
from mmbalance.methods.amco import AMCo
from mmbalance.methods.base import Method
from mmbalance.methods.baseline import Baseline
from mmbalance.methods.cml import CML
from mmbalance.methods.gblending import GBlending
from mmbalance.methods.greedy import Greedy
from mmbalance.methods.lfm import LFM
from mmbalance.methods.mbsd import MBSD
from mmbalance.methods.mla import MLA
from mmbalance.methods.mmcosine import MMCosine
from mmbalance.methods.mmpareto import MMPareto
from mmbalance.methods.ogm_ge import OGMGE
from mmbalance.methods.opm import OPM
from mmbalance.methods.pmr import PMR
from mmbalance.methods.reconboost import ReconBoost
from mmbalance.methods.relearning import Relearning
from mmbalance.methods.umt import UMT
from mmbalance.methods.unimodal import Unimodal
from mmbalance.methods.valuation import Valuation

# Explicit, import-side-effect free (torchtune-style); tests check it equals the YAML files in conf/method.
METHODS: dict[str, type[Method]] = {
    "baseline": Baseline,
    "unimodal": Unimodal,
    # data stage
    "valuation": Valuation,
    # feed-forward (forward stage)
    "mla": MLA,
    "opm": OPM,
    "greedy": Greedy,
    "amco": AMCo,
    # objective (loss stage)
    "mmcosine": MMCosine,
    "umt": UMT,
    "mbsd": MBSD,
    "cml": CML,
    "mmpareto": MMPareto,
    "gblending": GBlending,
    "lfm": LFM,
    # optimization (gradient stage)
    "ogm_ge": OGMGE,
    "agm": AGM,
    "pmr": PMR,
    "relearning": Relearning,
    "reconboost": ReconBoost,
}

# The BalanceBenchmark taxonomy: the stage each method acts at (reports group and average by it).
FAMILIES: dict[str, str] = {
    "baseline": "reference",
    "unimodal": "reference",
    "valuation": "data",
    **dict.fromkeys(["mla", "opm", "greedy", "amco"], "feed-forward"),
    **dict.fromkeys(["mmcosine", "umt", "mbsd", "cml", "mmpareto", "gblending", "lfm"], "objective"),
    **dict.fromkeys(["ogm_ge", "agm", "pmr", "relearning", "reconboost"], "optimization"),
}

for _key, _cls in METHODS.items():
    _cls.registry_key = _key
    _cls.family = FAMILIES[_key]


def list_methods() -> list[str]:
    return sorted(METHODS)
