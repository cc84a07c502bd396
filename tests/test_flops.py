"""The analytic FLOP count: MACs read from the traced layers, frozen prefixes pruned."""

from jaxtransfer.nets import flops, models


def test_seed_net_counts():
  """FinalNet (8, 16, 32), 5 classes: the table in benchmarks/README.md."""
  macs = flops.layer_macs(models.FinalNet(5))
  # conv: H * W * 9 * C_in * C_out (one branch of the CPU/accelerator switch); head: 512 * 5.
  assert macs == [221_184, 589_824, 294_912, 589_824, 294_912, 589_824, 2_560]
  assert flops.forward_flops_per_image(macs) == 2 * 2_583_040
  assert [flops.training_flops_per_image(macs, n) for n in (0, 2, 4, 6)
         ] == [15_055_872, 11_664_384, 8_125_440, 5_171_200]
  # Fully frozen but the head: forward everywhere, the head's weight gradient only.
  assert flops.training_flops_per_image(macs, 6) == 2 * 2_583_040 + 2 * 2_560


def test_other_nets_and_image_sizes():
  assert flops.layer_macs(models.InitialNet(5)) == [32 * 32 * 9 * 3 * 3] * 8 + [3072 * 5]
  assert flops.layer_macs(models.FinalNet(2, (2, 2, 2)), (8, 8, 3)) == [
      8 * 8 * 9 * 3 * 2, 8 * 8 * 9 * 2 * 2, 4 * 4 * 9 * 2 * 2, 4 * 4 * 9 * 2 * 2, 2 * 2 * 9 * 2 * 2,
      2 * 2 * 9 * 2 * 2, 2 * 2
  ]
