#!/bin/sh
# GET /cgi-bin/slow: answers 200 with the release after 2 seconds.
sleep 2
printf 'Content-Type: text/plain\r\n\r\n'
cat /etc/release
