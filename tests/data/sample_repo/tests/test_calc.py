import unittest

import calc


class CalcTest(unittest.TestCase):
    def test_add(self) -> None:
        self.assertEqual(calc.add(2, 3), 5)

    def test_mul(self) -> None:
        self.assertEqual(calc.mul(4, 5), 20)

    def test_setup_ran(self) -> None:
        with open(".setup-done") as f:
            self.assertEqual(f.read().strip(), "setup ok")


if __name__ == "__main__":
    unittest.main()
