"""Engine core: the Medusa step and its loop (engine), trees and acceptance (tree), the device's cost
model and tree planning (tune, autotree), and the exact-region probe (exactness)."""
