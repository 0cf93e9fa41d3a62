"""One visitor's session as small typed values: keys and prompts, never pixels or full-size maps.

Edits are plain functions of the state. Every object keeps the number it was born with (its name and
colour), so undoing or deleting never renumbers the others. The prompt sent to the engine lists the
objects that have points, in order; their label values in the map are 1..n in that order, as the API's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_UNDO = 200  # redo entries kept per object
DEFAULT_CATEGORY = "object"
MAX_CATEGORY = 64  # characters of a category name


@dataclass
class ObjectPrompt:
    number: int  # stable: "Object 3" stays "Object 3" whatever happens to the others
    points: list[list[float]] = field(default_factory=list)  # picture pixels [x, y]
    labels: list[int] = field(default_factory=list)  # 1 include, 0 exclude
    choice: int = 0  # the chosen candidate (0-2) while the object has one point
    box: list[float] | None = None  # [x0, y0, x1, y1] in picture pixels, drawn in Box mode
    # the object's edits in order, so undo takes back the last one whatever its kind: ("point",) or
    # ("box", the box it replaced); redo holds what undo took: ("point", point, label) or ("box", box)
    edits: list[tuple] = field(default_factory=list)
    redo: list[tuple] = field(default_factory=list)
    category: str = DEFAULT_CATEGORY  # its class name in the COCO / YOLO exports

    @property
    def prompted(self) -> bool:
        return bool(self.points) or self.box is not None


@dataclass(frozen=True)
class Picture:
    name: str
    width: int
    height: int
    preview: tuple[int, int]  # (width, height) of the picture the browser shows
    source: str  # the uploaded bytes on disk (session folder or an example), to re-embed if evicted
    key: str | None = None  # the embedding's cache key once embedded


@dataclass
class Slot:
    """One picture of a session with its own objects, numbers and undo/redo history. The current picture's
    live values are the session's own fields (`picture`, `objects`, `active`, `next_number`), so every edit
    above works unchanged; its slot is brought up to date when the person moves to another picture."""

    id: int  # stable within the session: its folder `pictures/<id>` and its file names
    picture: Picture
    objects: list[ObjectPrompt] = field(default_factory=lambda: [ObjectPrompt(1)])
    active: int = 0
    next_number: int = 2
    saved: str = ""  # the signature of the result last written to its folder ("" = none yet)


@dataclass
class Session:
    id: str
    model: str
    picture: Picture | None = None
    objects: list[ObjectPrompt] = field(default_factory=lambda: [ObjectPrompt(1)])
    active: int = 0  # index into objects
    hq_only: bool = False
    rev: int = 0  # bumped by every change of prompt or setting: downloads name the revision they belong to
    next_number: int = 2
    album: list[Slot] = field(default_factory=list)  # every picture of the session, in the strip's order
    current: int = -1  # index into album of the picture on screen (-1: none yet)
    next_slot: int = 1

    @property
    def active_object(self) -> ObjectPrompt:
        return self.objects[self.active]

    def prompted(self) -> list[ObjectPrompt]:
        return [obj for obj in self.objects if obj.prompted]


def changed(session: Session) -> Session:
    session.rev += 1
    return session


def add_point(session: Session, x: float, y: float, include: bool) -> Session:
    """A click: the point goes to the active object, clamped to the picture."""
    picture = session.picture
    if picture is not None:
        x = min(max(float(x), 0.0), picture.width - 1.0)
        y = min(max(float(y), 0.0), picture.height - 1.0)
    obj = session.active_object
    obj.points.append([round(float(x), 2), round(float(y), 2)])
    obj.labels.append(1 if include else 0)
    obj.choice = 0  # a new point changes the candidates
    obj.edits.append(("point",))
    obj.redo.clear()
    return changed(session)


def set_box(session: Session, x0: float, y0: float, x1: float, y1: float) -> Session:
    """A drag in Box mode: the active object's box (replacing its previous one), corners in either order,
    clamped to the picture. A box with no area is refused: it would be a click, not a box."""
    picture = session.picture
    xs, ys = sorted((float(x0), float(x1))), sorted((float(y0), float(y1)))
    if picture is not None:
        xs = [min(max(x, 0.0), float(picture.width)) for x in xs]
        ys = [min(max(y, 0.0), float(picture.height)) for y in ys]
    box = [round(xs[0], 2), round(ys[0], 2), round(xs[1], 2), round(ys[1], 2)]
    if box[2] - box[0] < 1 or box[3] - box[1] < 1:
        raise ValueError("A box needs an area: drag across the object, or click two opposite corners.")
    obj = session.active_object
    obj.edits.append(("box", obj.box))
    obj.box = box
    obj.choice = 0  # a box makes the object unambiguous: one candidate
    obj.redo.clear()
    return changed(session)


def undo_point(session: Session) -> Session:
    """Take back the last edit of the active object (a point, or its box: the previous box returns);
    redo brings it back. Other objects are untouched."""
    obj = session.active_object
    if not obj.edits:
        return session
    edit = obj.edits.pop()
    if edit[0] == "box":
        obj.redo.append(("box", obj.box))
        obj.box = edit[1]
    else:
        obj.redo.append(("point", obj.points.pop(), obj.labels.pop()))
    del obj.redo[:-MAX_UNDO]
    obj.choice = 0
    return changed(session)


def redo_point(session: Session) -> Session:
    obj = session.active_object
    if obj.redo:
        edit = obj.redo.pop()
        if edit[0] == "box":
            obj.edits.append(("box", obj.box))
            obj.box = edit[1]
        else:
            obj.points.append(edit[1])
            obj.labels.append(edit[2])
            obj.edits.append(("point",))
        obj.choice = 0
        changed(session)
    return session


def new_object(session: Session) -> Session:
    """Start the next object; an empty active object is reused rather than piling up empty ones."""
    if session.active_object.prompted:
        session.objects.append(ObjectPrompt(session.next_number))
        session.next_number += 1
        session.active = len(session.objects) - 1
    return session


def delete_object(session: Session) -> Session:
    """Delete the active object; the others keep their numbers. The last one left is emptied instead."""
    was_prompted = session.active_object.prompted
    if len(session.objects) == 1:
        session.objects[0] = ObjectPrompt(session.objects[0].number)
    else:
        session.objects.pop(session.active)
        session.active = min(session.active, len(session.objects) - 1)
    return changed(session) if was_prompted else session


def select_object(session: Session, number: int) -> Session:
    for index, obj in enumerate(session.objects):
        if obj.number == number:
            session.active = index
    return session


def choose_candidate(session: Session, index: int) -> Session:
    obj = session.active_object
    if len(obj.points) == 1 and obj.box is None and 0 <= int(index) <= 2 and obj.choice != int(index):
        obj.choice = int(index)
        changed(session)
    return session


def clear_all(session: Session) -> Session:
    session.objects = [ObjectPrompt(1)]
    session.active = 0
    session.next_number = 2
    return changed(session)


def set_hq_only(session: Session, hq_only: bool) -> Session:
    if bool(hq_only) != session.hq_only:
        session.hq_only = bool(hq_only)
        changed(session)
    return session


def set_picture(session: Session, picture: Picture) -> Session:
    """Today's upload: the picture on screen is replaced (a new slot in its place), its objects cleared."""
    if session.current < 0:
        return add_picture(session, picture, show=True)
    session.album[session.current] = Slot(session.next_slot, picture)
    session.next_slot += 1
    session.picture = picture
    return clear_all(session)


def stash(session: Session) -> None:
    """Bring the current picture's slot up to date with the session's live fields."""
    if session.current >= 0:
        slot = session.album[session.current]
        slot.picture, slot.objects, slot.active, slot.next_number = (
            session.picture,
            session.objects,
            session.active,
            session.next_number,
        )


def slot(session: Session, index: int) -> Slot:
    """Picture `index` with its objects as they are now (the current one's are the live fields)."""
    stash(session)
    return session.album[index]


def add_picture(session: Session, picture: Picture, show: bool) -> Session:
    """Another picture at the end of the strip; `show` moves to it (the first picture is always shown)."""
    session.album.append(Slot(session.next_slot, picture))
    session.next_slot += 1
    if show or session.current < 0:
        switch_picture(session, len(session.album) - 1)
    return session


def switch_picture(session: Session, index: int) -> Session:
    """Move to picture `index`: the one left keeps its objects, numbers and history in its slot."""
    if not 0 <= index < len(session.album):
        raise IndexError(index)
    stash(session)
    target = session.album[index]
    session.current = index
    session.picture, session.objects, session.active, session.next_number = (
        target.picture,
        target.objects,
        target.active,
        target.next_number,
    )
    return changed(session)


def remove_picture(session: Session, index: int) -> Slot:
    """Take picture `index` out of the strip (a picture added by mistake); the one after it (or before it, at
    the end) is shown if it was on screen. The last picture stays: a page always has one once it has any."""
    if not 0 <= index < len(session.album):
        raise IndexError(index)
    if len(session.album) == 1:
        raise ValueError("This is the page's only picture: upload another one to replace it.")
    stash(session)
    removed = session.album.pop(index)
    if index < session.current:
        session.current -= 1
    elif index == session.current:
        session.current = -1
        switch_picture(session, min(index, len(session.album) - 1))
    return removed


def set_category(session: Session, name: str) -> Session:
    """The active object's category (its class in the COCO and YOLO exports); empty = the default."""
    name = " ".join(str(name).split())
    if len(name) > MAX_CATEGORY or any(not c.isprintable() for c in name):
        raise ValueError(f"A category is a name of at most {MAX_CATEGORY} characters.")
    name = name or DEFAULT_CATEGORY
    if session.active_object.category != name:
        session.active_object.category = name
        changed(session)
    return session
