"""NASViT A0-A5: subnets of the NASViT supernet under the paper's MACs targets.

Targets 208, 309, 421, 528, 591, 757 M at resolutions 192, 224, 256, 256, 288, 288 (paper,
Table 2; A3/A4 figures unconfirmed). The method (compact_vit/search/nasvit.py) bisects a relative
position in every choice list until the subnet's MACs are within 2% of the target (else the
nearest subnet met); its results are the `nasvit_a0`..`a5` table in compact_vit/models/nasvit.py:
212.7, 308.9, 414.3, 504.6, 563.0, 692.7 M (+2.2, 0.0, -1.6, -4.4, -4.7, -8.5%). Nothing is
trained, so no accuracy: each takes its weights from the supernet (`slice_params`).

  python search.py --config configs/nasvit_search.py --workdir runs/nasvit_search

`:quick` searches A0 only (a minute or two on a 2-core CPU):

  python search.py --config configs/nasvit_search.py:quick --workdir runs/nasvit_search_quick
"""
import ml_collections

from configs import common

TARGETS = (("nasvit_a0", 208, 192), ("nasvit_a1", 309, 224), ("nasvit_a2", 421, 256),
           ("nasvit_a3", 528, 256), ("nasvit_a4", 591, 288), ("nasvit_a5", 757, 288))


def get_config(arg=None):
  args = common.parse_arg(arg, quick=False)
  c = ml_collections.ConfigDict()
  c.search = ml_collections.ConfigDict()
  c.search.method = "nasvit_macs"
  c.search.targets = TARGETS[:1] if args.quick else TARGETS
  c.search.tolerance = 0.02
  c.search.max_iters = 8
  return c
