"""NASViT A0-A5: subnets of the NASViT supernet under the paper's MACs targets.

Targets 208, 309, 421, 528, 591, 757 M at resolutions 192, 224, 256, 256, 288, 288 (paper,
Table 2; A3/A4 figures unconfirmed). The method (compact_vit/search/nasvit.py) bisects a relative
position in every choice list until the subnet's MACs are within 2% of the target (else the
nearest subnet met); its results are the `nasvit_a0`..`a5` table in compact_vit/models/nasvit.py:
212.7, 308.9, 414.3, 504.6, 563.0, 692.7 M (+2.2, 0.0, -1.6, -4.4, -4.7, -8.5%). No accuracy
by default (the MACs search needs no training): each takes its weights from the supernet
(`slice_params`).

  python search.py --config configs/nasvit_search.py --workdir runs/nasvit_search

`--config.search.evaluate=True --config.search.supernet_workdir=DIR` (DIR the workdir of
configs/nasvit_supernet.py) also scores each found subnet: supernet weights, BatchNorm statistics
recalibrated on `calib_batches` training batches, val top-1 at the subnet's resolution.

`:quick` searches one subnet of the tiny space (`nasvit_supernet_tiny`, 0.14 M MACs at 16 px;
seconds), and scores it on `digits` after recalibration when given the `:quick` supernet:

  python search.py --config configs/nasvit_search.py:quick --workdir runs/nasvit_search_quick
  python search.py --config configs/nasvit_search.py:quick --workdir runs/nasvit_search_quick \
      --config.search.evaluate=True --config.search.supernet_workdir=runs/nasvit_quick
"""
import ml_collections

from configs import nasvit_supernet

TARGETS = (("nasvit_a0", 208, 192), ("nasvit_a1", 309, 224), ("nasvit_a2", 421, 256),
           ("nasvit_a3", 528, 256), ("nasvit_a4", 591, 288), ("nasvit_a5", 757, 288))


TINY_TARGETS = (("nasvit_tiny_a", 0.14, 16),)  # `:quick`: the tiny space's own scale


def get_config(arg=None):
  c = nasvit_supernet.get_config(arg)  # the supernet's data and model, for `evaluate`
  quick = c.model.name == "nasvit_supernet_tiny"
  c.search = ml_collections.ConfigDict()
  c.search.method = "nasvit_macs"
  c.search.targets = TINY_TARGETS if quick else TARGETS
  c.search.tolerance = 0.02
  c.search.max_iters = 8
  c.search.evaluate = False
  c.search.supernet_workdir = ""
  c.search.calib_batches = 4 if quick else 2  # batches of config.batch_size (2 x 2048 images)
  return c
