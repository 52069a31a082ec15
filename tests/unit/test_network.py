import subprocess
import sys

import pytest
import torch

from photoz.model.network.pasquet import INCEPTION_SPECS, POOL_AFTER, STEM_CHANNELS, VARIANTS, build, variant_config


def expected_parameter_count(cfg) -> int:
    """Parameter count derived from the paper's layer list, independently of the module code."""
    c = cfg.channels

    def conv(c_in, c_out, k):  # weights + bias + per-channel PReLU slope
        return c_in * k * k * c_out + c_out + c_out

    total = conv(cfg.n_bands, c(STEM_CHANNELS), 5)
    c_in, side = c(STEM_CHANNELS), cfg.cutout_size // 2
    for i, (s1, s2, with_5x5) in enumerate(INCEPTION_SPECS):
        s1, s2 = c(s1), c(s2)
        total += conv(c_in, s2, 1) + conv(c_in, s1, 1) + conv(s1, s2, 3) + conv(c_in, s1, 1)
        if with_5x5:
            total += conv(c_in, s1, 1) + conv(s1, s2, 5)
        c_in = s2 * (3 if with_5x5 else 2) + s1
        side //= 2 if i in POOL_AFTER else 1
    n_flat = c_in * side * side + 1  # + E(B-V)
    d = cfg.dense_units
    total += (n_flat * d + d) + (d * d + d) + (d * cfg.n_bins + cfg.n_bins)
    return total


def n_params(net):
    return sum(p.numel() for p in net.parameters())


def test_pasquet2019_parameter_count_matches_layer_list():
    net = build("pasquet2019")
    assert n_params(net) == expected_parameter_count(net.config) == 27_596_372


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_matches_its_layer_list(variant):
    net = build(variant)
    assert n_params(net) == expected_parameter_count(net.config)


def test_cpu_variant_is_about_a_quarter_of_the_flops():
    from photoz.model.network.summary import layer_table

    full = sum(r.flops for r in layer_table(build("pasquet2019")))
    half = sum(r.flops for r in layer_table(build("pasquet2019_half")))
    assert 1.50e9 < full < 1.54e9
    assert 0.35e9 < half < 0.45e9


def test_output_is_a_probability_vector_per_cutout(tiny_net):
    images = torch.rand(7, 5, 64, 64) * 10
    probs = tiny_net(images, torch.rand(7, 1) * 0.1)
    assert probs.shape == (7, 180)
    assert torch.all(probs >= 0)
    assert torch.allclose(probs.sum(dim=1), torch.ones(7), atol=1e-6)


def test_n_bins_follows_config():
    net = build("pasquet2019_tiny", n_bins=50)
    assert net(torch.zeros(2, 5, 64, 64), torch.zeros(2, 1)).shape == (2, 50)


def test_normalisation_is_asinh_with_band_softening():
    net = build("pasquet2019_tiny")
    norm = net.features[0]
    x = torch.tensor([0.0, 1e-3, 1.0, 100.0, -5.0]).reshape(1, 5, 1, 1).expand(1, 5, 2, 2).contiguous()
    b = torch.tensor(net.config.softening_nmgy).reshape(1, 5, 1, 1)
    assert torch.allclose(norm(x), torch.asinh(x / b), rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in norm.parameters())


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(KeyError, match="known: pasquet2019"):
        variant_config("resnet50")


def test_summary_command_prints_layers_and_totals():
    out = subprocess.run([sys.executable, "-m", "photoz", "summary", "--variant", "pasquet2019"],
                         capture_output=True, text=True, check=True).stdout
    assert "Total params: 27,596,372" in out
    assert "Trainable params: 27,596,372" in out
    assert "FLOPs per cutout: 1.519 GFLOP" in out
    assert "features.1.0 (Conv2d)" in out and "(64, 64, 64)" in out


def test_dropout_adds_no_parameters_and_keeps_the_layer_names():
    """Dropout modules exist only when the rate is above 0, so a network without it has the state-dict keys
    older checkpoints were saved with."""
    plain, dropped = build("pasquet2019_tiny"), build("pasquet2019_tiny", dropout=0.2)
    assert [k for k in plain.state_dict() if k.startswith("classifier")] == \
        ["classifier.0.weight", "classifier.0.bias", "classifier.2.weight", "classifier.2.bias",
         "classifier.4.weight", "classifier.4.bias"]
    assert n_params(plain) == n_params(dropped) == expected_parameter_count(variant_config("pasquet2019_tiny"))
    assert "dropout" not in {k for k, v in plain.config.to_dict().items() if v}  # 0 by default


def test_mc_dropout_averages_fixed_thinned_heads_over_one_pass_of_the_convolutions():
    from photoz.model.network.pasquet import MCDropoutNet

    torch.manual_seed(0)
    net = build("pasquet2019_tiny", dropout=0.3).eval()
    images, ebv = torch.rand(3, 5, 64, 64), torch.rand(3, 1) * 0.1
    mc = MCDropoutNet(net, passes=4, seed=7)
    with torch.no_grad():
        got = mc(images, ebv)
        again = MCDropoutNet(net, passes=4, seed=7)(images, ebv)
        other_seed = MCDropoutNet(net, passes=4, seed=8)(images, ebv)
        plain = net(images, ebv)
        # by hand: each pass keeps a fixed subset of each hidden layer's units, scaled by 1 / (1 - rate)
        x = torch.cat([net.features(images), ebv], dim=1)
        l1, l2, l3 = [m for m in net.classifier if isinstance(m, torch.nn.Linear)]
        passes = []
        for t in range(4):
            h = torch.relu(l1(x)) * mc.mask0[t]
            h = torch.relu(l2(h)) * mc.mask1[t]
            passes.append(torch.softmax(l3(h), dim=1))
    torch.testing.assert_close(got, torch.stack(passes).mean(0))
    torch.testing.assert_close(got, again)  # the masks are fixed by the seed: deterministic
    assert (got - other_seed).abs().max() > 1e-6 and (got - plain).abs().max() > 1e-6
    torch.testing.assert_close(got.sum(1), torch.ones(3))
    kept = mc.mask0[:, 0] > 0
    assert 0.5 < kept.float().mean() < 0.9  # rate 0.3
    torch.testing.assert_close(mc.mask0[:, 0][kept], torch.full((int(kept.sum()),), 1 / 0.7))
    with pytest.raises(ValueError, match="trained with dropout"):
        MCDropoutNet(build("pasquet2019_tiny"), passes=4)
