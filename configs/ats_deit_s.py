"""ATS on DeiT-S (Fayyaz et al., "Adaptive Token Sampler", ECCV 2022; compact_vit/models/ats.py).

Parameter-free: ATS in blocks 3, 6, 9 with K = 176, 144, 116 slots (3.70 GMACs, 0.80x DeiT-S
with static shapes). Off the shelf, evaluate converted DeiT-S weights directly:

  python -m compact_vit.convert --model ats_deit_s \
      --checkpoint deit_small_patch16_224-cd65a155.pth --out weights/ats_deit_s
  python eval.py --config configs/ats_deit_s.py --workdir runs/ats_deit_s_ots \
      --config.init_from=weights/ats_deit_s

Fine-tuned: 30 epochs of the DeiT recipe at lr 1e-4 x batch/1024 (configs/token_reduction_common.py):

  python train.py --config configs/ats_deit_s.py --workdir runs/ats_deit_s \
      --config.init_from=weights/ats_deit_s

Expected top-1 (paper, its adaptive multi-stage setting, ~2.9 GFLOPs): ≈79.7 fine-tuned [?];
not measured here for this static schedule. `:quick` trains a shrunken ATS-DeiT (16x16 digits in
4x4 patches, ATS in blocks 1 and 2 with K = 13 and 9 slots) from scratch on `digits`:

  python train.py --config configs/ats_deit_s.py:quick --workdir runs/ats_quick
"""
from configs import token_reduction_common as trc


def get_config(arg=None):
  args = trc.common.parse_arg(arg, quick=False)
  c = trc.finetune_recipe("ats_deit_s", drop_path_rate=0.1)
  trc.common.cite(c, eval="adaptivetokensampling/ATS libs/datasets/imagenet.py: "
                          "Resize(int(256 / 224 * 224)) + CenterCrop(224); the authors release "
                          "evaluation only (configs/ImageNet/DeiT_S.yaml: TRAIN.ENABLE False)")
  if args.quick:
    trc.make_quick(c, ats_blocks=(1, 2), num_tokens=(13, 9))
  return c
