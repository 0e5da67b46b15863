"""The delivery service: a simulated courier pool that carries orders' food, with trips that
move on in time."""
