"""The one image file-naming scheme (CLI files and API zip entries)."""
from amskv.naming import image_file_name


def test_name_carries_index_class_and_seed_and_sorts_in_request_order():
    assert image_file_name(0, 207, 5) == "000_c207_s5.png"
    names = [image_file_name(i, 3, 100 - i) for i in (0, 1, 2, 10, 99, 255)]
    assert sorted(names) == names
