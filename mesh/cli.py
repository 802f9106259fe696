import sys
print("ok")
