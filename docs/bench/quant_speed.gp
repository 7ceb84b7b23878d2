# Drawn by qtune-bench; re-run with `gnuplot quant_speed.gp` in this folder (scripts/plot_bench.sh does every plot).
set terminal pngcairo size 1000,600 enhanced font 'DejaVu Sans,10'
set output 'quant_speed.png'
set encoding utf8
set grid lc rgb '#dddddd'
set key noenhanced
set termoption noenhanced
$s << EOD
"nf4" 1.23312 1.37622 1.61129
"nf4 dq=false" 1.20016 1.3093 1.62661
"hqq nbits=4" 1.18548 1.43388 1.58041
"hqq nbits=4 gs=128" 1.11178 1.37143 1.59835
"hqq nbits=3" 0.47734 1.64148 2.77143
"hqq nbits=2 gs=16" 0.256691 1.9203 3.66531
"hqq nbits=2" 0.368339 1.62282 2.55586
"hqq nbits=8" 1.23612 1.40382 1.60164
"int8" 0.994334 1.20305 1.28512
"int8 gs=128" 0.952531 1.12303 1.33017
EOD
set title 'Speed on gaussian 11008x4096 (ratios measured in the same run)'
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set xtics rotate by -30 left font ',9'
set ylabel 'ratio (log)'
set logscale y
set key outside top center horizontal
set xrange [-0.6:9.6]
set bmargin 6
plot $s using 2:xtic(1) title 'dequantize to fp32: GB/s / memcpy GB/s', \
     '' using 3 title 'linear fwd+bwd fp32: time / dense fp32', \
     '' using 4 title 'linear fwd+bwd bf16: time / dense bf16', \
     1 with lines dt 2 lc rgb 'black' notitle
