"""What opt_ds writes is readable by colleagues: converted checkpoints and exports follow the user's umask
(not tempfile's private 0700/0600), like preprocess's datasets."""
from conversion.cli import main
from conversion_helpers import tiny_hf_model
from file_modes import umask, unreadable


def test_conversions_are_readable_by_group_and_others_under_umask_022(tmp_path):
    tiny_hf_model("pre_ln").save_pretrained(tmp_path / "hf")
    with umask(0o022):
        assert main([str(tmp_path / "hf"), str(tmp_path / "ods"), "--to", "opt_ds", "--tp", "2", "--no-verify"]) == 0
        assert main([str(tmp_path / "ods"), str(tmp_path / "export"), "--to", "hf", "--no-verify"]) == 0
    for converted in ("ods", "export"):
        assert unreadable(tmp_path / converted) == []
    assert not list(tmp_path.glob(".*")), "no staging folder is left behind"
