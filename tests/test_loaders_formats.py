"""Format detection: config.json / hf_quant_config.json -> the scheme of a layer's experts.

compressed-tensors configs are built with compressed-tensors' own presets and dumped as llm-compressor writes them.
"""

import pytest

from moequant.config import QuantConfig
from moequant.loaders.formats import UnsupportedFormatError, detect_format, module_matches

E = 4
EXPERTS_L0 = [f"model.layers.0.mlp.experts.{e}.{p}" for e in range(E) for p in ("gate_proj", "down_proj", "up_proj")]
EXPERTS_L1 = [n.replace("layers.0", "layers.1") for n in EXPERTS_L0]
CT_FORMATS = {"W4A16": "pack-quantized", "W4A16_ASYM": "pack-quantized", "W8A16": "pack-quantized",
              "FP8": "float-quantized", "FP8_DYNAMIC": "float-quantized", "FP8_BLOCK": "float-quantized",
              "NVFP4": "nvfp4-pack-quantized", "NVFP4A16": "nvfp4-pack-quantized",
              "MXFP4A16": "mxfp4-pack-quantized", "W8A8": "int-quantized", "W4A8": "pack-quantized",
              "MXFP4": "mxfp4-pack-quantized"}


def ct_config(groups: dict, ignore=("lm_head", "re:.*mlp.gate$"), status="compressed") -> dict:
    """config.json with a compressed-tensors quantization_config; groups: {preset: targets}."""
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    config_groups, fmts = {}, set()
    for i, (preset, targets) in enumerate(groups.items()):
        scheme = preset_name_to_scheme(preset, list(targets))
        scheme.format = CT_FORMATS[preset]
        fmts.add(CT_FORMATS[preset])
        config_groups[f"group_{i}"] = scheme
    qc = QuantizationConfig(config_groups=config_groups, ignore=list(ignore),
                            format=fmts.pop() if len(fmts) == 1 else "mixed-precision")
    d = qc.model_dump(mode="json")
    d["quantization_status"] = status
    return {"quantization_config": d}


@pytest.mark.parametrize("preset, expected", [
    ("W4A16", QuantConfig("w4a16", group_size=128)),
    ("W4A16_ASYM", QuantConfig("w4a16-asym", group_size=128, symmetric=False)),
    ("W8A16", QuantConfig("w8a16", group_size=128)),
    ("FP8", QuantConfig("fp8-tensor", activation_scheme="static")),
    ("FP8_DYNAMIC", QuantConfig("fp8-channel")),
    ("FP8_BLOCK", QuantConfig("fp8-block", block_shape=(128, 128))),
    ("NVFP4", QuantConfig("nvfp4", group_size=16, activation_scheme="static")),
    ("NVFP4A16", QuantConfig("nvfp4a16", group_size=16)),
    ("MXFP4A16", QuantConfig("mxfp4", group_size=32)),
])
def test_compressed_tensors_presets(preset, expected):
    fmt = detect_format(ct_config({preset: ["Linear"]}))
    s = fmt.layer_scheme(EXPERTS_L0)
    assert s.config == expected
    assert (s.source, s.storage) == ("compressed-tensors", CT_FORMATS[preset])
    # the router is on the ignore list through a `re:` regex
    assert fmt.module_scheme("model.layers.0.mlp.gate").scheme == "unquantized"


@pytest.mark.parametrize("preset", ["W8A8", "W4A8", "MXFP4"])
def test_compressed_tensors_unsupported_lists_supported(preset):
    fmt = detect_format(ct_config({preset: ["Linear"]}))
    with pytest.raises(UnsupportedFormatError, match="Supported: unquantized"):
        fmt.layer_scheme(EXPERTS_L0)


def test_compressed_tensors_groups_targeting_experts():
    # experts get W4A16 through a regex group; other Linears FP8; an exact name beats both
    cfg = ct_config({"W4A16": ["re:.*mlp\\.experts\\..*"], "FP8": ["Linear"], "W8A16": [EXPERTS_L1[0]]})
    fmt = detect_format(cfg)
    assert fmt.layer_scheme(EXPERTS_L0).scheme == "w4a16"
    assert fmt.module_scheme("model.layers.0.self_attn.q_proj").scheme == "fp8-tensor"
    assert fmt.module_scheme(EXPERTS_L1[0]).scheme == "w8a16"
    with pytest.raises(UnsupportedFormatError, match="experts of one layer are quantized differently: .*experts.0.gate_proj "
                                                     "is w8a16 .* but .*experts.0.down_proj is w4a16"):
        fmt.layer_scheme(EXPERTS_L1)


def test_compressed_tensors_ignore_regex_and_names():
    fmt = detect_format(ct_config({"FP8": ["Linear"]}, ignore=["re:model\\.layers\\.0\\..*", "lm_head"]))
    assert fmt.layer_scheme(EXPERTS_L0).scheme == "unquantized"  # whole layer 0 ignored by regex
    assert fmt.layer_scheme(EXPERTS_L1).scheme == "fp8-tensor"
    # ignoring a single expert's projection leaves a layer FusedMoE cannot hold
    fmt = detect_format(ct_config({"FP8": ["Linear"]}, ignore=[EXPERTS_L0[5]]))
    with pytest.raises(UnsupportedFormatError, match="quantized differently"):
        fmt.layer_scheme(EXPERTS_L0)


def test_compressed_tensors_old_group_actorder_is_read():
    # compressed-tensors <= 0.18 wrote actorder "group" (with weight_g_idx); 0.19 refuses to parse it
    cfg = ct_config({"W4A16": ["Linear"]})
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    assert detect_format(cfg).layer_scheme(EXPERTS_L0).config == QuantConfig("w4a16", group_size=128, act_order=True)


def test_compressed_tensors_status_and_sparsity():
    with pytest.raises(UnsupportedFormatError, match="quantization_status 'frozen'"):
        detect_format(ct_config({"FP8": ["Linear"]}, status="frozen"))
    cfg = ct_config({"FP8": ["Linear"]})
    cfg["quantization_config"]["sparsity_config"] = {"format": "sparse-24-bitmask"}
    with pytest.raises(UnsupportedFormatError, match="sparsity format 'sparse-24-bitmask'"):
        detect_format(cfg)


@pytest.mark.parametrize("algo, expected", [
    ("NVFP4", QuantConfig("nvfp4", group_size=16, activation_scheme="static")),
    ("FP8", QuantConfig("fp8-tensor", activation_scheme="static")),
    ("FP8_PER_CHANNEL_PER_TOKEN", QuantConfig("fp8-channel")),
])
def test_modelopt(algo, expected):
    hq = {"producer": {"name": "modelopt", "version": "0.29"},
          "quantization": {"quant_algo": algo, "group_size": 16,
                           "exclude_modules": ["lm_head", "model.layers.*.mlp.gate", "model.layers.1.mlp.experts*"]}}
    fmt = detect_format({}, hq)
    s = fmt.layer_scheme(EXPERTS_L0)
    assert s.config == expected and s.source == "modelopt"
    assert fmt.module_scheme("model.layers.3.mlp.gate").scheme == "unquantized"
    assert fmt.layer_scheme(EXPERTS_L1).scheme == "unquantized"  # wildcard exclusion of a whole layer's experts
    # the same written into config.json by newer ModelOpt
    cfg = {"quantization_config": {"quant_method": "modelopt", "quant_algo": algo, "exclude_modules": []}}
    assert detect_format(cfg).layer_scheme(EXPERTS_L1).config == expected


def test_modelopt_unsupported():
    with pytest.raises(UnsupportedFormatError, match="ModelOpt quant_algo 'W4A16_AWQ'. Supported:"):
        detect_format({}, {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "W4A16_AWQ"}})


def test_gptq():
    base = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True}
    fmt = detect_format({"quantization_config": base})
    s = fmt.layer_scheme(EXPERTS_L0)
    assert s.config == QuantConfig("w4a16", group_size=128, act_order=True) and (s.source, s.storage) == ("gptq", "gptq")
    cfg = {**base, "bits": 8, "group_size": -1, "desc_act": False, "checkpoint_format": "gptq_v2",
           "dynamic": {"-:model\\.layers\\.0\\..*": {}}}
    fmt = detect_format({"quantization_config": cfg})
    assert fmt.layer_scheme(EXPERTS_L1).config == QuantConfig("w8a16", group_size=None)
    assert fmt.layer_scheme(EXPERTS_L1).storage == "gptq_v2"
    assert fmt.layer_scheme(EXPERTS_L0).scheme == "unquantized"  # GPTQModel's negative dynamic rule
    assert detect_format({"quantization_config": {**base, "sym": False}}).layer_scheme(EXPERTS_L0).scheme == "w4a16-asym"
    with pytest.raises(UnsupportedFormatError, match="GPTQ bits=3"):
        detect_format({"quantization_config": {**base, "bits": 3}}).layer_scheme(EXPERTS_L0)
    with pytest.raises(UnsupportedFormatError, match="checkpoint_format 'marlin'"):
        detect_format({"quantization_config": {**base, "checkpoint_format": "marlin"}})


def test_native_fp8_and_gpt_oss_mxfp4_and_unquantized():
    fmt = detect_format({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                                 "weight_block_size": [128, 128]}})
    assert fmt.layer_scheme(EXPERTS_L0).config == QuantConfig("fp8-block", block_shape=(128, 128))
    fmt = detect_format({"quantization_config": {"quant_method": "mxfp4",
                                                 "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router"]}})
    assert fmt.layer_scheme(["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]).scheme == "mxfp4"
    assert fmt.module_scheme("model.layers.0.mlp.router").scheme == "unquantized"
    assert detect_format({}).layer_scheme(EXPERTS_L0).scheme == "unquantized"
    with pytest.raises(UnsupportedFormatError, match="quant_method 'awq'. Supported:"):
        detect_format({"quantization_config": {"quant_method": "awq"}})


@pytest.mark.parametrize("name, pattern, hit", [
    ("model.layers.0.mlp.gate", "gate", True),            # a whole dotted component
    ("model.layers.0.mlp.experts.0.gate_proj", "gate", False),  # not a substring of gate_proj
    ("model.layers.0.mlp.experts.0.gate_proj", "model.layers.0.mlp", True),  # a parent module
    ("model.layers.10.mlp.gate", "model.layers.1*", True),  # fnmatch wildcard
    ("model.layers.0.mlp.gate", "re:.*mlp\\.gate$", True),
])
def test_module_matches(name, pattern, hit):
    assert module_matches(name, pattern) is hit
