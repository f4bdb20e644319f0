"""Typed ids shared by the pure policy modules."""

from typing import NewType

RequestId = NewType("RequestId", str)
BlockId = NewType("BlockId", int)
