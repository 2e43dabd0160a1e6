import pytest
from pydantic import ValidationError

from raychat.core.data.schema import Conversation


def test_canonical_conversation_defaults_weight_condition_and_system():
    conv = Conversation.model_validate(
        {"items": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    )
    assert [m.weight for m in conv.items] == [1.0, 1.0]
    assert (conv.condition, conv.system) == ("", "")


@pytest.mark.parametrize(
    "items",
    [
        [{"role": "user", "content": "q"}],  # nothing to learn from
        [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}],  # blank turn
        [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],  # system is not a turn
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": -0.5}],
    ],
)
def test_canonical_conversation_invariants(items):
    with pytest.raises(ValidationError):
        Conversation.model_validate({"items": items})
