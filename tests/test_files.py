"""Result files are replaced whole: a write that fails leaves the earlier file as it was."""

import json
import os

import pytest

from paligemma_json.files import replace_atomically, write_json_atomically


def test_a_failed_write_leaves_the_earlier_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomically({"field_f1": 0.5}, str(path))

    def crash(temporary):
        open(temporary, "w").write('{"field_f1": 0.')
        raise KeyboardInterrupt  # the run dies halfway through the write
    with pytest.raises(KeyboardInterrupt):
        replace_atomically(crash, str(path))
    assert json.loads(path.read_text()) == {"field_f1": 0.5}


def test_a_folder_is_replaced_whole(tmp_path):
    final = tmp_path / "final"
    (final / "old").mkdir(parents=True)

    def write(temporary):
        os.makedirs(temporary)
        open(os.path.join(temporary, "model.safetensors"), "w").write("new")
    replace_atomically(write, str(final))
    assert sorted(os.listdir(final)) == ["model.safetensors"] and not (tmp_path / "final.tmp").exists()
