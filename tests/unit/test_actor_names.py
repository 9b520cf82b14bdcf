"""Actor names are built and read back in one place (services.actor_names)."""
import pytest

from services.actor_names import BUFFER, actor_name, actor_role, parse_actor_name


@pytest.mark.parametrize("role, index", [("student", 0), ("teacher", 12), ("learner", 1), (BUFFER, None)])
def test_a_name_reads_back_as_what_made_it(role, index):
    assert parse_actor_name(actor_name(role, index)) == (role, index)


def test_the_names_are_the_ones_logs_and_the_status_page_show():
    assert [actor_name("student", 0), actor_name("teacher", 1), actor_name("buffer")] == \
        ["student-0", "teacher-1", "buffer"]
    assert actor_role("teacher-3") == "teacher" and actor_role("odd") == "odd"


def test_a_name_it_did_not_make_is_refused():
    with pytest.raises(ValueError, match="not an actor name"):
        parse_actor_name("student-x")
